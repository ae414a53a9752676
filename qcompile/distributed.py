"""Calibration across processes with torch.distributed.

Under `torchrun --nproc-per-node N` (or any launcher that sets `WORLD_SIZE` and `RANK`), `quantize_checkpoint`
gives each rank every N-th calibration batch; each rank observes its own batches, then the observers' statistics
are combined so that every rank converts from the same numbers: maxima by max (exact, so max-calibrated results are
bit for bit those of one process), sums (per-channel |x| sums, x^T x, row counts) by sum, and sampled rows gathered
and interleaved in batch order. Sums in another order round differently, so AWQ, SmoothQuant and GPTQ come out
close to, not identical with, one process. Rank 0 writes the checkpoint. docs/streaming.md.
"""

from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> tuple[int, int]:
    """Join the process group a launcher described in the environment (`WORLD_SIZE` > 1), once: gloo on the CPU,
    NCCL where CUDA is. Returns (rank, world size)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world()


def share(batches: list, rank: int, size: int) -> list:
    """This rank's calibration batches: every `size`-th, from the `rank`-th."""
    if len(batches) < size:
        raise ValueError(f"{len(batches)} calibration batches cannot be split across {size} processes: give at least "
                         "one per process")
    return batches[rank::size]


def reduce_observers(observers: dict) -> None:
    """Combine every rank's observers (`passes.insert_observers.ActivationObserver`, one per layer) in place."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return
    for name in sorted(observers):
        observer = observers[name]
        if observer.channel_amax is None:
            raise ValueError(f"layer {name!r} saw no calibration batch on this process")
        dist.all_reduce(observer.channel_amax, op=dist.ReduceOp.MAX)
        dist.all_reduce(observer.channel_abs_sum, op=dist.ReduceOp.SUM)
        observer.amax = observer.channel_amax.amax()
        if observer.xtx is not None:
            dist.all_reduce(observer.xtx, op=dist.ReduceOp.SUM)
        counts = torch.tensor([observer.rows_seen, observer.batches], dtype=torch.int64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        observer.rows_seen, observer.batches = (int(c) for c in counts)
        for fold in (0, 1):
            mine = observer.fold_channel_amax[fold]
            seen = torch.tensor([mine is not None], dtype=torch.int64)
            dist.all_reduce(seen, op=dist.ReduceOp.SUM)
            if int(seen):
                value = torch.zeros_like(observer.channel_amax) if mine is None else mine  # |x| >= 0: max-neutral
                dist.all_reduce(value, op=dist.ReduceOp.MAX)
                observer.fold_channel_amax[fold] = value
        if observer.keep_rows:
            gathered: list = [None] * size
            dist.all_gather_object(gathered, (observer.samples, observer.sample_folds))
            samples, folds = [], []
            for j in range(max(len(s) for s, _ in gathered)):  # rank r's j-th batch is batch j * size + r
                for rank_samples, rank_folds in gathered:
                    if j < len(rank_samples):
                        samples.append(rank_samples[j])
                        folds.append(rank_folds[j])
            observer.samples, observer.sample_folds = samples, folds


def barrier() -> None:
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()
