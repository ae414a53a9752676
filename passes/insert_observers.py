"""Insert activation observers in front of the linears that need calibration, and take them out again."""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from qcompile.passes.find_linears import LinearSite

OBSERVER_PREFIX = "_qcompile_observer_"


class ActivationObserver(nn.Module):
    """Records, over calibration batches, the max of |x| per tensor and per input channel, the mean of |x| per
    channel, and (when asked) a fixed-size sample of input rows.

    Static scales read the per-tensor max; SmoothQuant the per-channel max; AWQ the per-channel mean; the scale
    searches measure output error on the sampled rows. With `hessian=True` it also sums x^T x (float32), for
    GPTQ's one-shot Hessians (`hessian` property: 2 X^T X / N) and AWQ's output error. While fewer rows than input
    channels have been seen, the rows are held instead and summed, batch by batch in the same order, when `xtx` is
    first read: a short calibration then holds rows x K floats per layer rather than K x K (0.13 GB for a layer
    that reads 5632 channels).
    """

    def __init__(self, layer_name: str, keep_rows: int = 0, hessian: bool = False):
        super().__init__()
        self.layer_name = layer_name
        self.keep_rows = keep_rows
        self.wants_hessian = hessian
        self._xtx: Tensor | None = None
        self._unsummed_rows: list[Tensor] = []  # calibration rows not yet in _xtx, oldest first
        self.amax: Tensor | None = None
        self.channel_amax: Tensor | None = None
        self.channel_abs_sum: Tensor | None = None
        # Per-channel max over the even-numbered and the odd-numbered batches, and which of the two each kept
        # sample came from: searches fit on one half and measure on the other (see `smoothquant.search_alpha`).
        self.fold_channel_amax: list[Tensor | None] = [None, None]
        self.sample_folds: list[int] = []
        self.rows_seen = 0
        self.samples: list[Tensor] = []
        self.batches = 0
        # (offset, stride) of this process's batches among all (qcompile.distributed): the fold of a batch is the
        # parity of its index among all batches, as in one process
        self.batch_numbering = (0, 1)
        self._generator = torch.Generator().manual_seed(0)

    @property
    def xtx(self) -> Tensor | None:
        """sum of x^T x over every observed row (float32), or None where it was not recorded."""
        self._sum_held_rows()
        return self._xtx

    @xtx.setter
    def xtx(self, value: Tensor | None) -> None:
        self._unsummed_rows = []
        self._xtx = value

    @property
    def records_xtx(self) -> bool:
        """Whether x^T x was recorded (without summing held rows into it)."""
        return self._xtx is not None or bool(self._unsummed_rows)

    def _sum_held_rows(self) -> None:
        for flat in self._unsummed_rows:  # in place: a second K x K matrix per batch would double the peak
            self._xtx = flat.t() @ flat if self._xtx is None else self._xtx.addmm_(flat.t(), flat)
        self._unsummed_rows = []

    def _record_xtx(self, flat: Tensor, x: Tensor) -> None:
        if self._xtx is None and sum(len(f) for f in self._unsummed_rows) + len(flat) <= flat.shape[1]:
            # held rather than summed: fewer rows than channels take less memory than x^T x; a copy where `flat`
            # is `x` itself, which the graph may still change in place
            shares_input = flat.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            self._unsummed_rows.append(flat.clone() if shares_input else flat)
            return
        self._sum_held_rows()
        self._xtx = flat.t() @ flat if self._xtx is None else self._xtx.addmm_(flat.t(), flat)

    @property
    def channel_abs_mean(self) -> Tensor | None:
        return None if self.channel_abs_sum is None else self.channel_abs_sum / max(self.rows_seen, 1)

    @property
    def hessian(self) -> Tensor | None:
        """GPTQ's H = 2 X^T X / N over every calibration row (None unless built with hessian=True)."""
        return None if self.xtx is None else self.xtx * (2.0 / max(self.rows_seen, 1))

    @property
    def sample(self) -> Tensor | None:
        """Kept input rows `[rows, in_features]` (float32), or None if none were kept."""
        return torch.cat(self.samples)[: self.keep_rows] if self.samples else None

    def folds(self) -> list[tuple[Tensor, Tensor]] | None:
        """[(channel amax of one half of the batches, kept rows of the other half)] for both halves, or None when
        either half saw nothing or kept no rows."""
        if any(amax is None for amax in self.fold_channel_amax) or not self.samples:
            return None
        rows = [[s for s, f in zip(self.samples, self.sample_folds) if f == fold] for fold in (0, 1)]
        if not rows[0] or not rows[1]:
            return None
        return [(self.fold_channel_amax[1 - fold], torch.cat(rows[fold])) for fold in (0, 1)]

    def merge(self, other: ActivationObserver) -> ActivationObserver:
        """Fold another observer of the same layer (another graph that saw other batches) into this one."""
        if other.channel_amax is not None:
            if self.channel_amax is None:
                self.channel_amax, self.channel_abs_sum = other.channel_amax, other.channel_abs_sum
            else:
                self.channel_amax = torch.maximum(self.channel_amax, other.channel_amax)
                self.channel_abs_sum = self.channel_abs_sum + other.channel_abs_sum
            self.amax = self.channel_amax.amax()
        if other.xtx is not None:
            self.xtx = other.xtx.clone() if self.xtx is None else self.xtx + other.xtx
        self.rows_seen += other.rows_seen
        self.batches += other.batches
        for fold in (0, 1):
            mine, theirs = self.fold_channel_amax[fold], other.fold_channel_amax[fold]
            if theirs is not None:
                self.fold_channel_amax[fold] = theirs if mine is None else torch.maximum(mine, theirs)
        self.samples = (self.samples + other.samples)
        self.sample_folds = (self.sample_folds + other.sample_folds)
        return self

    def _keep(self, flat: Tensor, fold: int) -> None:
        room = self.keep_rows - sum(len(s) for s in self.samples)
        if room <= 0 or not len(flat):
            return
        # An even spread over the batches: each batch gives at most its share of rows, chosen at random.
        take = min(room, len(flat), max(1, self.keep_rows // 8))
        index = torch.randperm(len(flat), generator=self._generator)[:take].to(flat.device)
        self.samples.append(flat[index].clone())
        self.sample_folds.append(fold)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            flat = x.detach().float().reshape(-1, x.shape[-1])
            if not torch.isfinite(flat).all():
                raise ValueError(
                    f"calibration data gives NaN or inf in the input of layer {self.layer_name!r}; "
                    "check the calibration batches (and the model's float output on them)"
                )
            magnitude = flat.abs()
            channel_amax = magnitude.amax(dim=0) if flat.numel() else flat.new_zeros(x.shape[-1])
            channel_sum = magnitude.sum(dim=0)
            if self.channel_amax is None:
                self.channel_amax, self.channel_abs_sum = channel_amax, channel_sum
            else:
                self.channel_amax = torch.maximum(self.channel_amax, channel_amax)
                self.channel_abs_sum = self.channel_abs_sum + channel_sum
            self.amax = self.channel_amax.amax()
            offset, stride = self.batch_numbering
            fold = (offset + self.batches * stride) % 2
            previous = self.fold_channel_amax[fold]
            self.fold_channel_amax[fold] = channel_amax if previous is None else torch.maximum(previous, channel_amax)
            if self.wants_hessian:
                self._record_xtx(flat, x)
            self.rows_seen += len(flat)
            self.batches += 1
            self._keep(flat, fold)
        return x


def insert_observers(
    gm: fx.GraphModule, sites: list[LinearSite], keep_rows: int = 0, hessian: bool = False
) -> dict[str, ActivationObserver]:
    """Route the input of each site through an observer submodule; returns observers by layer name.

    `keep_rows` > 0 keeps that many sampled input rows per layer, for the algorithms that search scales;
    `hessian` sums x^T x per layer (GPTQ without sequential calibration).
    """
    observers = {}
    for index, site in enumerate(sites):
        observer = ActivationObserver(site.name, keep_rows, hessian)
        target = f"{OBSERVER_PREFIX}{index}"
        gm.add_submodule(target, observer)
        with gm.graph.inserting_before(site.node):
            observed = gm.graph.call_module(target, (site.input,))
        observed.meta.update(site.input.meta)
        site.node.replace_input_with(site.input, observed)
        observers[site.name] = observer
    gm.recompile()
    return observers


def remove_observers(gm: fx.GraphModule, prefix: str = OBSERVER_PREFIX) -> None:
    """Undo `insert_observers` (or another pass's observers, named `prefix...`): every observer node is replaced
    by its input."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(prefix):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    gm.recompile()
