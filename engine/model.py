"""The LLaMA forward pass: RMSNorm, RoPE, GQA attention, SwiGLU. One file, no cache logic.

Every projection goes through `ops.linear`: a decode step's few rows stream the weights through the
native matvec, a prompt's many rows go to the GEMM of F.linear.

Under tensor parallelism (engine/dist) each rank holds its heads and hidden units (`args` are the
shard's) and the output projections wo and w2 add their partial products summed over the ranks
(`add_projection`); with one process `tp` is None and nothing else changes.

Attention over a KV cache is delegated to the cache (`KVCache` below; engine.kv.KVStore is the one the
engine uses), which owns RoPE for cached keys because the eviction policy decides at which positions
they are rotated. The caller says which phase the tokens are in: a prompt chunk (any length, attended
exactly, then compressed) or a decode step (one token per sequence).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelArgs
from .rope import Rope

if TYPE_CHECKING:
    from .dist import TensorParallel

Phase = Literal["prefill", "decode"]


class KVCache(Protocol):
    """What the forward pass needs of a KV cache: attention of the new tokens over the stored sequence and
    themselves, storing them on the way. Before RoPE in, attention output out."""

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A prompt chunk: q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D)."""
        ...

    def decode(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """One token per sequence: its fused q/k/v row (B, (H + 2 Hkv) D) -> (B, H, D)."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def project(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """F.linear(self(x), w): on the decode path the norm is the projection's prologue, one op call."""
        return ops.linear(x, w, norm=self.weight, eps=self.eps)


def add_projection(h: torch.Tensor, w: torch.Tensor, x: torch.Tensor, tp: TensorParallel | None,
                   swiglu: bool = False) -> torch.Tensor:
    """x += F.linear(h, w) in place, x returned. Under tensor parallelism w holds this rank's input columns:
    the ranks' partial products are summed into x (one collective; TensorParallel.add_reduced)."""
    if tp is None:
        return ops.linear(h, w, add_to=x, swiglu=swiglu)
    return tp.add_reduced(ops.linear(h, w, swiglu=swiglu), x)


def _fuse_rows(*linears: nn.Linear) -> torch.Tensor:
    """Concatenate the weights row-wise and make each layer's weight a view into the result (no second copy)."""
    fused, views = ops.cat_rows([lin.weight for lin in linears])
    for lin, view in zip(linears, views):
        lin.weight = view
    return fused


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, q, bias=False)
        self.wk = nn.Linear(args.dim, kv, bias=False)
        self.wv = nn.Linear(args.dim, kv, bias=False)
        self.wo = nn.Linear(q, args.dim, bias=False)
        self.wqkv: torch.Tensor | None = None  # fused [q + 2 kv, dim], built by fuse()

    def fuse(self) -> None:
        """One matmul for q, k and v: fewer, larger calls on the decode path."""
        self.wqkv = _fuse_rows(self.wq, self.wk, self.wv)

    def forward(self, x: torch.Tensor, norm: RMSNorm, layer: int, rope: Rope, kv: KVCache | None,
                phase: Phase) -> torch.Tensor:
        """Adds attention(norm(x)) into the residual stream x in place and returns it."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:
            qkv = norm.project(x, self.wqkv)
        else:
            qkv = torch.cat([norm.project(x, lin.weight) for lin in (self.wq, self.wk, self.wv)], dim=-1)
        if kv is not None and phase == "decode":  # one token: the cache takes the fused row as is
            y = kv.decode(layer, qkv.view(B, -1))  # (B, H, D)
            return add_projection(y.view(B, 1, H * D), self.wo.weight, x, self.tp)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if kv is None:
            rope.ensure(T)
            pos = torch.arange(T, device=x.device)
            q, k = rope.rotate(q, pos), rope.rotate(k, pos)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        else:
            y = kv.prefill(layer, q, k, v)  # (B, H, T, D)
        return add_projection(y.transpose(1, 2).reshape(B, T, H * D), self.wo.weight, x, self.tp)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w13: torch.Tensor | None = None

    def fuse(self) -> None:
        self.w13 = _fuse_rows(self.w1, self.w3)

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """Adds w2 (silu(w1 h) * w3 h), h = norm(x), into the residual stream x in place and returns it."""
        if self.w13 is not None:
            gate_up = norm.project(x, self.w13)
        else:
            gate_up = torch.cat([norm.project(x, lin.weight) for lin in (self.w1, self.w3)], dim=-1)
        return add_projection(gate_up, self.w2.weight, x, self.tp, swiglu=True)  # the SwiGLU is w2's prologue


class Block(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, tp)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args, tp)

    def forward(self, x: torch.Tensor, layer: int, rope: Rope, kv: KVCache | None, phase: Phase) -> torch.Tensor:
        """x is the residual stream, updated in place: each sublayer normalises it in its first projection
        and adds its output projection into it. Unfused, the same two lines as any LLaMA:
        x = x + attention(attention_norm(x)); x = x + w2(silu(w1(ffn_norm(x))) * w3(ffn_norm(x)))."""
        x = self.attention(x, self.attention_norm, layer, rope, kv, phase)
        return self.feed_forward(x, self.ffn_norm)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel | None = None):
        """`args`: the whole model's; with `tp`, the modules (and `self.args`) are this rank's shard."""
        super().__init__()
        self.tp = tp
        self.args = args = tp.shard.local_args(args) if tp else args
        self.vocab_cut = tp.shard.vocab_cut(args) if tp else None  # this rank's rows of a vocabulary-split head
        # No random init (the weights are always assigned or drawn by the caller): Embedding's normal_ on the
        # meta device (from_state_dict) imports torch._dynamo and sympy, ~70 MB of RSS and ~1 s of a load.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(Block(args, tp) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        vocab_rows = args.vocab_size if self.vocab_cut is None else self.vocab_cut.stop - self.vocab_cut.start
        self.output = nn.Linear(args.dim, vocab_rows, bias=False)
        self.rope: Rope | None = None

    def forward(self, tokens: torch.Tensor, kv: KVCache | None = None, phase: Phase = "prefill",
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] ([B, 1, V] with last_only). Without `kv`: positions 0..T-1,
        plain causal attention. With `kv`: the tokens continue the sequence held by the cache, as a prompt
        chunk (phase="prefill") or as one decode step (phase="decode", T = 1)."""
        if self.rope is None:
            self.rope = Rope(self.args, self.tok_embeddings.weight.device)
        x = ops.embedding(tokens, self.tok_embeddings.weight)
        for i, layer in enumerate(self.layers):
            x = layer(x, i, self.rope, kv, phase)
        if last_only:
            x = x[:, -1:].contiguous()
        logits = self.norm.project(x, self.output.weight)
        return (logits if self.vocab_cut is None else self.tp.gather_vocab(logits)).float()

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state: dict[str, torch.Tensor], device: str | torch.device,
                        tp: TensorParallel | None = None) -> "Transformer":
        """Build on the meta device and assign the loaded tensors: the weights are never copied twice. A weight
        that is not a tensor (packed quantized blocks, engine.quant) replaces its parameter as it is. With
        `tp`, `state` holds this rank's parts (engine.weights.load_checkpoint's `shard`)."""
        with torch.device("meta"):
            model = cls(args, tp)
        if args.tie_embeddings:
            state = dict(state, **{"output.weight": ops.row_range(state["tok_embeddings.weight"], model.vocab_cut)})
        for name, w in state.items():
            if not isinstance(w, torch.Tensor):
                owner, attr = name.rsplit(".", 1)
                module = model.get_submodule(owner)
                delattr(module, attr)  # a parameter no more: state_dict and .to() leave it alone
                setattr(module, attr, w.to(device))
        model.load_state_dict({k: w for k, w in state.items() if isinstance(w, torch.Tensor)}, assign=True,
                              strict=True)
        if args.tie_embeddings:
            model.output.weight = ops.row_range(model.tok_embeddings.weight, model.vocab_cut)
        model = model.to(device).eval().requires_grad_(False)
        model.fuse()
        return model

    def fuse(self) -> None:
        """Fused q/k/v and gate/up weights in every block (done once the weights are on their device)."""
        for block in self.layers:
            block.attention.fuse()
            block.feed_forward.fuse()
