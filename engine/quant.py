"""Weights kept as quantized GGUF blocks: the packed-weight type `ops.linear` and `ops.embedding` dispatch on.

A decode step's time is the time to read the weights once. SmolLM2-135M's Q4_1 file holds ~98 MB of
blocks; dequantized to fp32 it is 538 MB, so every token would read 5.5x the bytes. A `PackedWeight`
keeps the file's blocks (uint8 [N, row_bytes], one row of blocks per output row, as the file stores
them) and multiplies by them directly: a decode step's rows go through `ops.qmatvec`, which dequantizes
in registers; a prompt's many rows go to a GEMM over tiles of rows dequantized into a small scratch
buffer, so the process never holds a dense copy of the whole model. With `q8_activations` (--weights
packed-q8act) the decode products go through `ops.qmatvec_q8` instead, llama.cpp's arithmetic (8-bit
activations, integer dot products): ~1.7x faster products on Q4 blocks, ~2x for a batched step's 8 rows.

A fused projection (q/k/v, gate/up) may join rows of different types (a Q4_K_M file keeps some v and
down projections in Q6_K): a packed weight is a list of parts, each a run of rows of one type.

The model file never sees a quant type: it asks `ops.linear`, `ops.embedding` and `ops.cat_rows`,
which hand a `PackedWeight` to its own methods here.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import ops, reference

# What `engine.load(weights=...)` and `--weights` accept. "packed-q8act": packed, with a decode step's products
# made as llama.cpp makes them (activations quantized to 8 bits per block of 32: ops.qmatvec_q8).
WEIGHT_MODES = ("packed", "packed-q8act", "dequantize", "q8_0", "q4_0")
PACKED_MODES = ("packed", "packed-q8act")  # the modes that keep a GGUF file's blocks
QUANTIZE_AT_LOAD = {"q8_0": 8, "q4_0": 2}  # ggml type ids (gguf.GGMLQuantizationType)
# Rows of W dequantized at a time for a prompt's GEMM: 4096 rows of a 4096-wide model are 64 MB of fp32.
TILE_ROWS = 4096


class QuantError(ValueError):
    """A weight that cannot be kept packed: its type has no kernel, or its rows are not whole blocks."""


def type_name(qtype: int) -> str:
    return reference.GGML_TYPE_NAMES.get(qtype, f"type {qtype}")


def row_bytes(qtype: int, K: int, what: str) -> int:
    """Bytes of a row of K weights of a type kept packed; one line naming the type and the way out, for
    a weight `what` that cannot be kept packed."""
    if qtype not in reference.QUANT_TYPES:
        supported = ", ".join(name for name, _, _ in reference.QUANT_TYPES.values())
        raise QuantError(f"{what}: quant type {type_name(qtype)} is not kept packed (supported: {supported}); "
                         "load with --weights dequantize")
    _, block, nbytes = reference.QUANT_TYPES[qtype]
    if K % block:
        raise QuantError(f"{what}: rows of {K} weights are not whole {type_name(qtype)} blocks of {block}; "
                         "load with --weights dequantize")
    return K // block * nbytes


def _mapped(blocks: np.ndarray) -> Tensor:
    """The blocks as a tensor sharing the array's memory, no copy: a GGUF file's blocks stay in its memory
    map (pages the kernel shares with the page cache, read once). torch warns that the map is read-only;
    nothing writes to weights."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(blocks)


@dataclass(frozen=True)
class Part:
    """A run of rows of one quant type: blocks uint8 [rows, row_bytes]."""

    blocks: Tensor
    qtype: int

    @property
    def rows(self) -> int:
        return self.blocks.shape[0]


class PackedWeight:
    """A weight matrix [N, K] (F.linear's layout) held as quantized blocks, computing in `dtype`.

    It answers `shape`, `dtype`, `device` and `nbytes` like a tensor, so code that only asks those (the
    decode plan's buffer sizes, byte counts) needs no branch for it. `q8_activations`: a decode step's products
    quantize their activations to 8 bits first (ops.qmatvec_q8, llama.cpp's arithmetic: ~1.7x faster on
    Q4_0/Q4_1, not the dequantized model's numbers up to summation order any more); a prompt's GEMM is exact."""

    def __init__(self, parts: Sequence[Part], K: int, dtype: torch.dtype, q8_activations: bool = False):
        self.parts, self.K, self.dtype, self.q8_activations = tuple(parts), K, dtype, q8_activations
        self.shape = torch.Size([sum(p.rows for p in self.parts), K])
        self.device = self.parts[0].blocks.device

    @classmethod
    def from_blocks(cls, blocks: Tensor | np.ndarray, qtype: int, K: int, dtype: torch.dtype,
                    what: str = "weight") -> "PackedWeight":
        nbytes = row_bytes(qtype, K, what)
        data = _mapped(blocks) if isinstance(blocks, np.ndarray) else blocks
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != nbytes:
            raise QuantError(f"{what}: {type_name(qtype)} blocks of shape {tuple(data.shape)} ({data.dtype}) "
                             f"do not hold rows of {K} weights ({nbytes} bytes each)")
        return cls([Part(data.contiguous(), qtype)], K, dtype)

    @classmethod
    def quantize(cls, w: Tensor, qtype: int, dtype: torch.dtype, what: str = "weight") -> "PackedWeight":
        """w [N, K] quantized with the gguf library's own quantizer (its blocks, byte for byte)."""
        import gguf

        row_bytes(qtype, w.shape[1], what)
        blocks = gguf.quants.quantize(w.detach().to(torch.float32).cpu().numpy(), gguf.GGMLQuantizationType(qtype))
        return cls.from_blocks(blocks, qtype, w.shape[1], dtype, what).to(w.device)

    # ---- tensor-like ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(p.blocks.nbytes for p in self.parts)

    @property
    def qtypes(self) -> tuple[str, ...]:
        return tuple(type_name(p.qtype) for p in self.parts)

    def __repr__(self) -> str:
        return f"PackedWeight({list(self.shape)}, {'+'.join(self.qtypes)}, {self.nbytes} bytes, {self.dtype})"

    def to(self, device: torch.device | str) -> "PackedWeight":
        return PackedWeight([Part(p.blocks.to(device), p.qtype) for p in self.parts], self.K, self.dtype,
                            self.q8_activations)

    def with_q8_activations(self) -> "PackedWeight":
        """The same blocks, its decode products made with 8-bit activations (see the class)."""
        return PackedWeight(self.parts, self.K, self.dtype, q8_activations=True)

    def rows(self, index: Tensor) -> "PackedWeight":
        """The rows `index` (1-D, within one part), in that order: q/k's RoPE layout is a row permutation."""
        (part,) = self.parts
        return PackedWeight([Part(part.blocks.index_select(0, index.to(part.blocks.device)), part.qtype)],
                            self.K, self.dtype, self.q8_activations)

    def row_range(self, start: int, stop: int) -> "PackedWeight":
        """Rows [start, stop) (within one part) as a view of the same blocks."""
        (part,) = self.parts
        return PackedWeight([Part(part.blocks[start:stop], part.qtype)], self.K, self.dtype, self.q8_activations)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense [N, K] matrix (tests and small tiles only: a whole model this way is what packing avoids)."""
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        start = 0
        for p in self.parts:
            ops.dequantize(p.blocks, p.qtype, out[start : start + p.rows])
            start += p.rows
        return out

    # ---- the ops ---------------------------------------------------------------------------------
    def linear(self, x: Tensor, add_to: Tensor | None, norm: Tensor | None, eps: float, swiglu: bool) -> Tensor:
        """ops.linear's contract with this weight (see there)."""
        if x.numel() > ops.MATVEC_MAX_ROWS * x.shape[-1]:
            return self._gemm(x, add_to, norm, eps, swiglu)
        x = x.contiguous()
        out = x.new_empty((*x.shape[:-1], self.shape[0])) if add_to is None else add_to
        self._matvec(x, out, add_to is not None, norm, eps, swiglu)
        return out

    @property
    def _product(self) -> str:
        """The op of a decode step's product: qmatvec, or qmatvec_q8 with 8-bit activations."""
        return "qmatvec_q8" if self.q8_activations else "qmatvec"

    def _matvec(self, x: Tensor, out: Tensor, accumulate: bool, norm: Tensor | None, eps: float,
                swiglu: bool) -> None:
        """A decode step's few rows: ops.qmatvec (or qmatvec_q8) per part, each into its columns of out."""
        product = getattr(ops, self._product)
        if len(self.parts) == 1:
            product(x, self.parts[0].blocks, self.parts[0].qtype, out, accumulate, norm, eps, swiglu)
            return
        rows = x.numel() // x.shape[-1]
        flat, rows_x, start = out.view(rows, -1), x.view(rows, -1), 0
        for p in self.parts:
            piece = flat[:, start : start + p.rows]
            if rows == 1:  # one row: its columns are contiguous, the kernel writes them in place
                product(rows_x, p.blocks, p.qtype, piece, accumulate, norm, eps, swiglu)
            else:
                y = x.new_empty(rows, p.rows)
                product(rows_x, p.blocks, p.qtype, y, False, norm, eps, swiglu)
                piece.add_(y) if accumulate else piece.copy_(y)
            start += p.rows

    def bound_matvec(self) -> ops.MatvecFn | None:
        """ops.bound_matvec for this weight: the compiled qmatvec (or qmatvec_q8) bound to its blocks (several
        parts: one call each)."""
        kernel = ops.compiled_kernel(self._product, self.device)
        if kernel is None:
            return None
        if len(self.parts) > 1:
            return self._matvec
        blocks, qtype = self.parts[0].blocks, self.parts[0].qtype
        return lambda x, out, accumulate, norm, eps, swiglu: kernel(x, blocks, qtype, out, accumulate, norm, eps,
                                                                    swiglu)

    def _gemm(self, x: Tensor, add_to: Tensor | None, norm: Tensor | None, eps: float, swiglu: bool) -> Tensor:
        """A prompt: the normalised input once, then F.linear over tiles of rows dequantized into one scratch."""
        h = reference.matvec_input(x, norm, eps, swiglu, ops.rms_norm)
        N, K = self.shape
        out = h.new_empty((*h.shape[:-1], N)) if add_to is None else add_to
        scratch = torch.empty(min(TILE_ROWS, max(p.rows for p in self.parts)), K, dtype=h.dtype, device=h.device)
        start = 0
        for p in self.parts:
            for lo in range(0, p.rows, TILE_ROWS):
                hi = min(lo + TILE_ROWS, p.rows)
                tile = scratch[: hi - lo]
                ops.dequantize(p.blocks[lo:hi], p.qtype, tile)
                y = torch.nn.functional.linear(h, tile)
                dest = out[..., start + lo : start + hi]
                dest.add_(y) if add_to is not None else dest.copy_(y)
            start += p.rows
        return out

    def embedding(self, tokens: Tensor) -> Tensor:
        """F.embedding(tokens, W): only the looked-up rows are dequantized."""
        (part,) = self.parts
        flat = tokens.reshape(-1)
        out = torch.empty(flat.numel(), self.K, dtype=self.dtype, device=self.device)
        ops.dequantize(part.blocks.index_select(0, flat), part.qtype, out)
        return out.view(*tokens.shape, self.K)

    @staticmethod
    def cat_rows(weights: Sequence["PackedWeight"]) -> tuple["PackedWeight", list["PackedWeight"]]:
        """The rows of `weights` as one weight (runs of one type joined into one part) and each input as
        a view of it: one projection call for q/k/v, with no second copy of the blocks."""
        first = weights[0]
        if any(not isinstance(w, PackedWeight) or w.K != first.K or w.dtype != first.dtype
               or w.q8_activations != first.q8_activations for w in weights):
            raise QuantError("cannot fuse packed weights with dense ones or of other widths; "
                             "load with --weights dequantize")
        runs: list[list[Part]] = []
        for w in weights:
            for p in w.parts:
                if runs and runs[-1][0].qtype == p.qtype:
                    runs[-1].append(p)
                else:
                    runs.append([p])
        fused = PackedWeight([Part(torch.cat([p.blocks for p in run]), run[0].qtype) for run in runs],
                             first.K, first.dtype, first.q8_activations)
        views, part, offset = [], 0, 0  # each input lies inside one fused part (its parts joined a run in order)
        for w in weights:
            pieces = []
            for p in w.parts:
                while offset >= fused.parts[part].rows:
                    part, offset = part + 1, 0
                pieces.append(Part(fused.parts[part].blocks[offset : offset + p.rows], p.qtype))
                offset += p.rows
            views.append(PackedWeight(pieces, w.K, w.dtype, w.q8_activations))
        return fused, views
