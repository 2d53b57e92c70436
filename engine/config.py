"""Model hyper-parameters: one dataclass, read from config.json, params.json or GGUF metadata."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A model folder's configuration is missing, malformed or unsupported."""


@dataclass
class RopeScaling:
    """RoPE frequency scaling (`type` is none | linear | dynamic | llama3), HF semantics."""

    type: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008  # SwiGLU inner size
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim: int = 0  # 0: dim // n_heads
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.eos_ids = tuple(self.eos_ids)
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_scaling.type not in ("none", "linear", "dynamic", "llama3"):
            raise ConfigError(f"unsupported rope scaling {self.rope_scaling.type!r} (none, linear, dynamic, llama3)")

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V one token takes in a cache of `dtype`, every layer and KV head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype.itemsize

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """From a Hugging Face `config.json` of a LLaMA-family model."""
        try:
            n_heads = cfg["num_attention_heads"]
            eos = cfg.get("eos_token_id", 2)
            return cls(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                hidden_dim=cfg["intermediate_size"],
                vocab_size=cfg["vocab_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
                rope_scaling=_hf_rope_scaling(cfg),
                max_seq_len=cfg.get("max_position_embeddings", 4096),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=cfg.get("head_dim") or 0,
                bos_id=cfg.get("bos_token_id", 1),
                eos_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required key {e.args[0]!r}") from None

    @classmethod
    def from_meta_params(cls, p: dict[str, Any], vocab_size: int) -> "ModelArgs":
        """From a Meta `params.json` (its FFN size follows Meta's rounding rule)."""
        dim = p["dim"]
        hidden = int(2 * (4 * dim) / 3)
        if p.get("ffn_dim_multiplier") is not None:
            hidden = int(p["ffn_dim_multiplier"] * hidden)
        multiple = p.get("multiple_of", 256)
        hidden = multiple * ((hidden + multiple - 1) // multiple)
        vocab = p.get("vocab_size", -1)
        return cls(
            dim=dim,
            n_layers=p["n_layers"],
            n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
            hidden_dim=hidden,
            vocab_size=vocab if vocab > 0 else vocab_size,
            norm_eps=p.get("norm_eps", 1e-5),
            rope_theta=p.get("rope_theta", 10000.0),
            max_seq_len=p.get("max_seq_len", 4096),
        )


def _hf_rope_scaling(cfg: dict[str, Any]) -> RopeScaling:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}  # transformers 5 names it rope_parameters
    kind = rs.get("rope_type", rs.get("type", "none")) or "none"
    if kind == "default":
        kind = "none"
    return RopeScaling(
        type=kind,
        factor=float(rs.get("factor", 1.0)),
        original_max_position_embeddings=rs.get("original_max_position_embeddings"),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
    )


def load_config_json(path: Path) -> ModelArgs:
    try:
        return ModelArgs.from_hf_config(json.loads(Path(path).read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


PRESETS: dict[str, ModelArgs] = {
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, max_seq_len=4096),
    "llama-2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824, max_seq_len=4096),
    "vicuna-7b-v1.5": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, max_seq_len=4096),
    "vicuna-7b-v1.5-16k": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, max_seq_len=16384,
        rope_scaling=RopeScaling(type="linear", factor=4.0),
    ),
    "smollm2-135m": ModelArgs(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
        rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True, bos_id=1, eos_ids=(2,),
    ),
}


def rope_inv_freq(args: ModelArgs, seq_len: int | None = None):
    """Inverse RoPE frequencies [head_dim/2] after scaling; `seq_len` drives dynamic-NTK."""
    import torch

    d, base, rs = args.head_dim, args.rope_theta, args.rope_scaling
    if rs.type == "dynamic" and seq_len is not None and seq_len > args.max_seq_len:
        base = base * ((rs.factor * seq_len / args.max_seq_len) - (rs.factor - 1)) ** (d / (d - 2))
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # fp32, as HF does
    if rs.type == "linear":
        inv = inv / rs.factor
    elif rs.type == "llama3":
        old_ctx = rs.original_max_position_embeddings or args.max_seq_len
        low_wavelen = old_ctx / rs.low_freq_factor
        high_wavelen = old_ctx / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = torch.where(is_mid, mid, scaled)
    return inv
