"""Model hyper-parameters: one dataclass, read from config.json, params.json or GGUF metadata.

Metadata is hostile input. Every value is read through `Source`, which checks its type and range (the
limits below) before anything is sized by it or loops over it, and names the file and the key when it
refuses one; `ModelArgs` checks the same limits and the relations between fields when it is built.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gguf
    import torch


class ConfigError(ValueError):
    """A model folder's configuration is missing, malformed or unsupported."""


@dataclass(frozen=True)
class Range:
    """The values a metadata number may take: an integer (or, with `integer=False`, a finite int or
    float) in [lo, hi], (lo, hi] with `open_lo`; `optional` also takes None (null: "there is none")."""

    lo: float
    hi: float
    integer: bool = True
    open_lo: bool = False
    optional: bool = False

    def accepts(self, value: object) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (self.lo < value if self.open_lo else self.lo <= value) and value <= self.hi

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.hi == math.inf:
            text = kind if self.lo == -math.inf else f"{kind} {'>' if self.open_lo else '>='} {_num(self.lo)}"
        else:
            text = f"{kind} in {'(' if self.open_lo else '['}{_num(self.lo)}, {_num(self.hi)}]"
        return text + " or null" * self.optional


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


# Bounds well above every published LLaMA-family model (Llama 3.1 405B: dim 16384, 126 layers, 128 heads,
# FFN 53248; vocabularies up to 256k; contexts up to 1M) and far below sizes that would allocate tens of
# GB (the RoPE tables hold max_seq_len x head_dim floats) or loop for hours.
MAX_CONTEXT = 1 << 21
MAX_VOCAB = 1 << 24
TOKEN_ID = Range(0, MAX_VOCAB - 1)
LIMITS = {
    "dim": Range(1, 1 << 16),
    "n_layers": Range(1, 1024),
    "n_heads": Range(1, 1024),
    "n_kv_heads": Range(1, 1024),
    "hidden_dim": Range(1, 1 << 20),
    "vocab_size": Range(1, MAX_VOCAB),
    "norm_eps": Range(0, 1, integer=False, open_lo=True),
    "rope_theta": Range(0, math.inf, integer=False, open_lo=True),
    "max_seq_len": Range(1, MAX_CONTEXT),
    "head_dim": Range(0, 1024),  # 0: dim // n_heads
    "bos_id": Range(0, MAX_VOCAB - 1, optional=True),
}
HEAD_DIM = Range(4, 1024)  # even, and > 2: dynamic NTK raises to the power head_dim / (head_dim - 2)
MAX_ROPE_TABLE = 1 << 28  # max_seq_len x head_dim floats in each RoPE table (1 GiB; 2M positions at 128)
ROPE_LIMITS = {
    "factor": Range(1, math.inf, integer=False),
    "original_max_position_embeddings": Range(1, MAX_CONTEXT, optional=True),
    "low_freq_factor": Range(0, math.inf, integer=False, open_lo=True),
    "high_freq_factor": Range(0, math.inf, integer=False, open_lo=True),
}
ROPE_TYPES = ("none", "linear", "dynamic", "llama3")
# ModelArgs field -> config.json key, for the fields read the same way (`Source.numbers`).
HF_FIELDS = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "hidden_dim": "intermediate_size", "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "head_dim": "head_dim", "bos_id": "bos_token_id",
}


def describe(value: object) -> str:
    """A found value for a one-line message: short, and never a raw newline from the file."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return f"a list (length {len(value)})"
    text = repr(value) if isinstance(value, (str, int, float)) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _check_limits(obj: object, limits: Mapping[str, Range]) -> None:
    for name, rng in limits.items():
        value = getattr(obj, name)
        if not rng.accepts(value):
            raise ConfigError(f"{name} must be {rng}, found {describe(value)}")


REQUIRED: Any = object()  # a `Source` default: the key must be there


class Source:
    """One metadata mapping (config.json, params.json, GGUF key/values, tokenizer_config.json) whose
    values are read with their types and ranges checked; an error names the file and the key, what was
    expected and what was found. A null value means "not set" (the default applies), except where the
    field may be none (a BOS id), where it means none."""

    def __init__(self, data: object, where: str, error: type[ValueError] = ConfigError, prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            what = f"{prefix[:-1]} must be an object" if prefix else "expected a JSON object"
            raise error(f"{where}: {what}, found {describe(data)}")
        self.data, self.where, self.error, self.prefix = data, where, error, prefix

    def fail(self, key: str, expected: str, found: object) -> ValueError:
        return self.error(f"{self.where}: {self.prefix}{key} must be {expected}, found {describe(found)}")

    def _default(self, key: str, expected: str, default: Any) -> Any:
        if default is not REQUIRED:
            return default
        if key in self.data:
            raise self.fail(key, expected, None)
        raise self.error(f"{self.where} lacks required key {self.prefix + key!r}")

    def number(self, key: str, rng: Range, default: Any = REQUIRED) -> Any:
        value = self.data.get(key)
        if value is None and (key not in self.data or not rng.optional):
            return self._default(key, str(rng), default)
        if not rng.accepts(value):
            raise self.fail(key, str(rng), value)
        return value if rng.integer or value is None else float(value)

    def numbers(self, keys: Mapping[str, str], **defaults: Any) -> dict[str, Any]:
        """ModelArgs fields from this file's keys (field -> key), each checked against LIMITS; the fields
        in `defaults` may be left out."""
        return {name: self.number(key, LIMITS[name], defaults.get(name, REQUIRED)) for name, key in keys.items()}

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return default if value is None else value

    def text(self, key: str, default: Any = REQUIRED) -> str:
        value = self.data.get(key)
        if value is None:
            return self._default(key, "a string", default)
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def section(self, key: str) -> Source:
        """A nested object (null or absent: empty), read with the same checks."""
        value = self.data.get(key)
        return Source({} if value is None else value, self.where, self.error, f"{self.prefix}{key}.")

    def ids(self, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        """A token id or a list of them; null: none."""
        if key not in self.data:
            return default
        value = self.data[key]
        items = [] if value is None else value if isinstance(value, list) else [value]
        bad = next((i for i in items if not TOKEN_ID.accepts(i)), REQUIRED)
        if bad is not REQUIRED:
            raise self.fail(key, f"a token id or a list of them, each {TOKEN_ID}", bad)
        return tuple(items)

    def array(self, key: str, item: Range | type, default: Any = REQUIRED, length: int | None = None) -> list:
        """A list whose every entry is `item` (a Range, or a type such as str), of `length` if given."""
        value = self.data.get(key)
        if value is None:
            return self._default(key, "a list", default)
        if not isinstance(value, list):
            raise self.fail(key, "a list", value)
        if length is not None and len(value) != length:
            raise self.fail(key, f"a list of {length} (one per token)", value)
        ok = item.accepts if isinstance(item, Range) else lambda x: isinstance(x, item)
        bad = next((i for i, x in enumerate(value) if not ok(x)), None)
        if bad is not None:
            expected = str(item) if isinstance(item, Range) else f"a {item.__name__}"
            raise self.fail(f"{key}[{bad}]", expected, value[bad])
        return value

    def build(self, cls: type, **kw: Any) -> Any:
        """`cls(**kw)`, whose own checks (relations between fields) are reported against this file."""
        try:
            return cls(**kw)
        except ConfigError as e:
            raise self.error(f"{self.where}: {e}") from None


def read_json(path: Path, error: type[ValueError] = ConfigError, text: str | None = None) -> Any:
    """A JSON file's content (parsed from `text` when the caller has read the file already); unreadable text,
    bad JSON or nesting too deep is one `error` naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") if text is None else text)
    except (ValueError, RecursionError) as e:  # JSON or UTF-8 errors, ints too long, nesting too deep
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"cannot read {path}: not valid JSON ({why})") from None


class GGUFMetadata(Mapping[str, Any]):
    """A GGUF file's key/values as Python values (str, int, float, bool, lists), decoded on access, so a
    `Source` checks them like a JSON object; a value that cannot be decoded is an `error` naming it."""

    def __init__(self, reader: gguf.GGUFReader, where: str, error: type[ValueError]) -> None:
        self.fields, self.where, self.error = reader.fields, where, error

    def __getitem__(self, key: str) -> Any:
        field = self.fields[key]
        try:
            return field.contents()
        except (ValueError, IndexError, TypeError, OverflowError) as e:
            raise self.error(f"{self.where}: GGUF metadata {key} cannot be decoded ({e})") from None

    def __contains__(self, key: object) -> bool:
        return key in self.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)


def gguf_source(reader: gguf.GGUFReader, error: type[ValueError] = ConfigError) -> Source:
    """A GGUF file's metadata as a `Source`: typed reads, errors naming the file and the key."""
    where = str(reader.data.filename)
    return Source(GGUFMetadata(reader, where, error), where, error)


@dataclass
class RopeScaling:
    """RoPE frequency scaling (`type` is none | linear | dynamic | llama3), HF semantics."""

    type: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope scaling {describe(self.type)} ({', '.join(ROPE_TYPES)})")
        _check_limits(self, ROPE_LIMITS)
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"llama3 rope scaling needs high_freq_factor {self.high_freq_factor} > "
                              f"low_freq_factor {self.low_freq_factor}")


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
        """Types and ranges (LIMITS), then the relations between fields, before anything is sized by them."""
        if isinstance(self.rope_scaling, Mapping):
            known = {f.name for f in fields(RopeScaling)}
            self.rope_scaling = RopeScaling(**{k: v for k, v in self.rope_scaling.items() if k in known})
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be an object, found {describe(self.rope_scaling)}")
        if not isinstance(self.eos_ids, (list, tuple)) or not all(TOKEN_ID.accepts(i) for i in self.eos_ids):
            raise ConfigError(f"eos_ids must be a list of token ids, each {TOKEN_ID}, found {describe(self.eos_ids)}")
        self.eos_ids = tuple(self.eos_ids)
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"tie_embeddings must be true or false, found {describe(self.tie_embeddings)}")
        _check_limits(self, LIMITS)
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if not HEAD_DIM.accepts(self.head_dim) or self.head_dim % 2:
            raise ConfigError(f"head_dim must be even and {HEAD_DIM}, found {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.max_seq_len * self.head_dim > MAX_ROPE_TABLE:
            raise ConfigError(f"max_seq_len {self.max_seq_len} x head_dim {self.head_dim} exceeds {MAX_ROPE_TABLE} "
                              f"(the RoPE tables are sized by it)")

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
    def from_hf_config(cls, cfg: object, where: str = "config.json") -> "ModelArgs":
        """From a Hugging Face `config.json` of a LLaMA-family model."""
        src = Source(cfg, where)
        kw = src.numbers(HF_FIELDS, norm_eps=1e-5, max_seq_len=4096, head_dim=0, bos_id=1)
        theta = src.section("rope_parameters").number("rope_theta", LIMITS["rope_theta"], 10000.0)
        return src.build(
            cls,
            **kw,
            n_kv_heads=src.number("num_key_value_heads", LIMITS["n_kv_heads"], kw["n_heads"]),
            rope_theta=src.number("rope_theta", LIMITS["rope_theta"], theta),
            rope_scaling=_hf_rope_scaling(src),
            tie_embeddings=src.flag("tie_word_embeddings", False),
            eos_ids=src.ids("eos_token_id", (2,)),
        )

    @classmethod
    def from_meta_params(cls, p: object, vocab_size: int, where: str = "params.json") -> "ModelArgs":
        """From a Meta `params.json` (its FFN size follows Meta's rounding rule; `vocab_size` is the
        embedding's rows, used when the file says -1)."""
        src = Source(p, where)
        kw = src.numbers({k: k for k in ("dim", "n_layers", "n_heads", "norm_eps", "rope_theta", "max_seq_len")},
                         norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
        hidden = int(2 * (4 * kw["dim"]) / 3)
        multiplier = src.number("ffn_dim_multiplier", Range(0, 64, integer=False, open_lo=True), None)
        if multiplier is not None:
            hidden = int(multiplier * hidden)
        multiple = src.number("multiple_of", Range(1, 1 << 16), 256)
        hidden = multiple * ((hidden + multiple - 1) // multiple)
        vocab = src.number("vocab_size", Range(-1, MAX_VOCAB), -1)
        return src.build(
            cls,
            **kw,
            n_kv_heads=src.number("n_kv_heads", LIMITS["n_kv_heads"], kw["n_heads"]),
            hidden_dim=hidden,
            vocab_size=vocab if vocab > 0 else vocab_size,
        )


def _hf_rope_scaling(cfg: Source) -> RopeScaling:
    rs = cfg.section("rope_scaling")
    if not rs.data:
        rs = cfg.section("rope_parameters")  # transformers 5 names it rope_parameters
    kind = rs.text("rope_type", rs.text("type", "none")) or "none"
    return rs.build(
        RopeScaling,
        type="none" if kind == "default" else kind,
        **{name: rs.number(name, rng, getattr(RopeScaling, name)) for name, rng in ROPE_LIMITS.items()},  # defaults
    )


def load_config_json(path: Path) -> ModelArgs:
    return ModelArgs.from_hf_config(read_json(path), str(path))


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
