"""RoPE tables, shared by the forward pass (a prompt without cache), the KV store (which rotates cached
keys at the positions the eviction policy chose) and the policies that score rotated keys."""
from __future__ import annotations

import torch

from .config import ModelArgs, rope_inv_freq
from .reference import rotate_half_dense


class Rope:
    """cos/sin tables indexed by position (rotate_half layout). Grown only by `ensure`, which host code
    calls with lengths it already knows, so rotating never syncs with the device."""

    def __init__(self, args: ModelArgs, device: torch.device):
        self.args, self.device = args, device
        self.cos = self.sin = torch.empty(0, args.head_dim, device=device)
        self.scaled_for = 0  # dynamic NTK: the sequence length the frequencies were scaled for

    def ensure(self, n: int) -> None:
        """Make positions < n valid. Dynamic NTK rescales by the sequence length, as HF does."""
        dynamic = self.args.rope_scaling.type == "dynamic"
        scaled_for = max(n, self.args.max_seq_len) if dynamic else 0
        if self.cos.shape[0] >= n and scaled_for == self.scaled_for:
            return
        size = n if dynamic else max(n, self.args.max_seq_len, 2 * self.cos.shape[0])
        inv = rope_inv_freq(self.args, scaled_for or None).to(self.device)
        angles = torch.arange(size, device=self.device, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin, self.scaled_for = emb.cos(), emb.sin(), scaled_for

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., D] by integer positions broadcastable to x[..., 0] (negative ones clamp to 0)."""
        positions = positions.clamp(min=0).long()
        return self.rotate_by(x, self.cos[positions], self.sin[positions])

    def at(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [D] of one position held in a 1-element device tensor (for ops.rope_append): looked up
        once per decode step, on the device, so the step has no host value in it."""
        return self.cos.index_select(0, position)[0], self.sin.index_select(0, position)[0]

    @staticmethod
    def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x cos + rotate_half(x) sin in fp32, rounded to x's dtype once: the bits of ops.rope_append and of
        decode_attention's rope argument, so keys rotated here and there agree exactly."""
        return rotate_half_dense(x, cos, sin, torch.float32).to(x.dtype)
