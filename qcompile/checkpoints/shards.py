"""Safetensors shards written as tensors arrive, with the index transformers reads.

Two ways to wait for a shard to fill: in memory (`export_hf`, whose tensors are all in memory already), or on disk
(`spill=True`, streaming quantization): each batch of tensors is saved at once to a small piece file and the shard
is assembled from the pieces' bytes when it is full, so no more than one batch is held in memory at a time. The
shard file is laid out as `docs/checkpoints.md#safetensors-files` describes (8-byte header length, JSON header,
tensors back to back, widest dtypes first so that every tensor is aligned to its element size).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
_COPY_CHUNK = 16 * 2**20


@dataclass
class _Spilled:
    """A tensor saved in a piece file: where its bytes lie and what its header entry says."""

    key: str
    piece: Path
    dtype: str
    shape: list[int]
    start: int  # absolute offsets in the piece file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class ShardWriter:
    """Shards of at most `max_bytes` (a larger tensor gets a shard of its own), named `model-0000i-of-0000n.safetensors`
    with their index at the end, or `model.safetensors` when one suffices. A shard is written as soon as it is full.
    `directory=None` writes nothing (a process of a distributed run other than rank 0)."""

    def __init__(self, directory: Path | None, max_bytes: int, *, spill: bool = False):
        self.directory, self.max_bytes, self.spill = directory, max_bytes, spill
        self.pending: list = []  # tensors (key, Tensor) in memory, or _Spilled entries
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str], int]] = []
        self._pieces = 0
        self._unwritten: dict[Path, int] = {}  # piece file -> its tensors not yet in a shard

    def add(self, tensors: dict[str, Tensor]) -> None:
        if self.directory is None:
            return
        batch = {}
        # safetensors refuses tensors of one file that share memory (tied or viewed parameters, one scale of
        # several layers): such a tensor is stored as a copy
        held = {v.data_ptr() for v in batch.values()} if self.spill else {
            item.data_ptr() for _, item in self.pending}
        for key, value in tensors.items():
            value = value.detach().contiguous().cpu()
            batch[key] = value.clone() if value.data_ptr() in held else value
            held.add(batch[key].data_ptr())
        if self.spill:
            entries = self._save_piece(batch)
        else:
            entries = [(key, batch[key], batch[key].numel() * batch[key].element_size()) for key in batch]
        for entry in entries:
            key, item, nbytes = (entry.key, entry, entry.nbytes) if self.spill else entry
            if self.pending and self.pending_bytes + nbytes > self.max_bytes:
                self._write_shard()
            self.pending.append((key, item))
            self.pending_bytes += nbytes

    def finish(self) -> None:
        if self.directory is None:
            return
        if self.pending or not self.parts:
            self._write_shard()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (path, keys, nbytes) in enumerate(self.parts, 1):
            name = f"model-{i:05d}-of-{len(self.parts):05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _write_shard(self) -> None:
        path = self.directory / f".part-{len(self.parts):05d}.safetensors"
        if self.spill:
            _assemble(path, [item for _, item in self.pending])
            for _, item in self.pending:
                self._unwritten[item.piece] -= 1
                if not self._unwritten[item.piece]:
                    item.piece.unlink()
                    del self._unwritten[item.piece]
        else:
            from safetensors.torch import save_file

            save_file(dict(self.pending), path, metadata={"format": "pt"})
        self.parts.append((path, sorted(key for key, _ in self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = [], 0

    def _save_piece(self, batch: dict[str, Tensor]) -> list[_Spilled]:
        from safetensors.torch import save_file

        if not batch:
            return []
        piece = self.directory / f".piece-{self._pieces:05d}.safetensors"
        self._pieces += 1
        save_file(batch, piece)
        header, data_start = read_header(piece)
        entries = [_Spilled(key, piece, header[key]["dtype"], header[key]["shape"],
                            data_start + header[key]["data_offsets"][0], data_start + header[key]["data_offsets"][1])
                   for key in batch]
        self._unwritten[piece] = len(entries)
        return entries


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header (without `__metadata__`) and the offset where its tensor bytes start."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _assemble(path: Path, entries: list[_Spilled]) -> None:
    """Write one safetensors file holding `entries`, copying their bytes from the piece files."""
    entries = sorted(entries, key=lambda e: (-_ITEM_BYTES.get(e.dtype, 1), e.key))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        header[e.key] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor bytes start 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for e in entries:
            with open(e.piece, "rb") as src:
                src.seek(e.start)
                left = e.nbytes
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OSError(f"{e.piece}: ends before tensor {e.key!r}")
                    out.write(chunk)
                    left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
