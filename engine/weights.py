"""Read checkpoints (HF safetensors, Meta consolidated .pth, GGUF) into one internal state dict.

Each format has one explicit name map to our internal (Meta/gpt-fast style) names. Our q/k rows use the
Hugging Face `rotate_half` RoPE layout; Meta and GGUF store them for interleaved-pair RoPE, so those two
are un-permuted on load. Tensors are read one at a time from memory-mapped files: the model is never
held twice.
"""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, TypeVar

import torch

from .config import (
    LIMITS, ROPE_LIMITS, ConfigError, ModelArgs, RopeScaling, Source, describe, gguf_source, load_config_json,
    read_json,
)
from .quant import PACKED_MODES, QUANTIZE_AT_LOAD, WEIGHT_MODES, PackedWeight

if TYPE_CHECKING:
    import gguf
    import numpy as np

    from .dist.shard import Cut, Shard


Sliceable = TypeVar("Sliceable")  # a tensor, an array or a safetensors slice: anything cut with [a:b] / [:, a:b]
Weight = torch.Tensor | PackedWeight  # a state dict's value: dense, or a matrix kept as quantized blocks


class WeightsError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not match its configuration."""


# Internal name -> name in the file; "{i}" is the layer index.
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
META_NAMES = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "layers.{i}.attention_norm.weight": "layers.{i}.attention_norm.weight",
    "layers.{i}.attention.wq.weight": "layers.{i}.attention.wq.weight",
    "layers.{i}.attention.wk.weight": "layers.{i}.attention.wk.weight",
    "layers.{i}.attention.wv.weight": "layers.{i}.attention.wv.weight",
    "layers.{i}.attention.wo.weight": "layers.{i}.attention.wo.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.feed_forward.w3.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.feed_forward.w2.weight",
    "norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
# ModelArgs field -> GGUF metadata key, for the fields read the same way (`Source.numbers`).
GGUF_FIELDS = {
    "dim": "llama.embedding_length", "n_layers": "llama.block_count", "n_heads": "llama.attention.head_count",
    "hidden_dim": "llama.feed_forward_length", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "rope_theta": "llama.rope.freq_base", "max_seq_len": "llama.context_length",
    "head_dim": "llama.attention.key_length", "bos_id": "tokenizer.ggml.bos_token_id",
}
# Buffers some checkpoints carry that are recomputed from the config (RoPE frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")

# GGUF tensor types we dequantize (through the `gguf` library); anything else is refused by name.
GGUF_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise WeightsError(f"unknown dtype {dtype!r} (one of: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every internal parameter name with its shape, in model order."""
    d, hd, f = args.dim, args.head_dim, args.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.n_kv_heads * hd, d),
            p + "attention.wv.weight": (args.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "ffn_norm.weight": (d,),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w3.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
        }
    shapes["norm.weight"] = (d,)
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def expand_names(names: dict[str, str], args: ModelArgs) -> dict[str, str]:
    """Internal name -> file name for every parameter of `args`, from a per-format template map."""
    out = {}
    for name in expected_shapes(args):
        parts = name.split(".")
        if parts[0] == "layers":
            out[name] = names["layers.{i}." + ".".join(parts[2:])].format(i=parts[1])
        else:
            out[name] = names[name]
    return out


def unpermute_rope(w: Weight, n_heads: int) -> Weight:
    """Rows of q/k from the interleaved-pair RoPE layout (Meta, GGUF) to HF's rotate_half layout (packed
    blocks too: whole rows move, each row's blocks stay as they are)."""
    n_out, dim_in = w.shape
    if isinstance(w, PackedWeight):
        return w.rows(unpermute_rope(torch.arange(n_out)[:, None], n_heads).view(-1))
    return w.view(n_heads, n_out // n_heads // 2, 2, dim_in).transpose(1, 2).reshape(n_out, dim_in)


def load_checkpoint(
    path: str | Path, dtype: str | torch.dtype = torch.float32, weights: str | None = None,
    reader: gguf.GGUFReader | None = None, shard: Shard | None = None,
) -> tuple[ModelArgs, dict[str, Weight], str]:
    """Load a model folder (HF or Meta) or a .gguf file: (args, internal state dict, "hf" | "meta" | "gguf").
    With `shard` (engine.dist): only that tensor-parallel rank's part of each weight is read, slice by slice
    from the mapped file (args stay the whole model's).

    `weights` (engine.quant.WEIGHT_MODES): "packed" keeps a GGUF file's quantized blocks (its default;
    "packed-q8act" too, its decode products with 8-bit activations as llama.cpp makes them),
    "dequantize" unpacks them to `dtype` (the default for a folder), "q8_0" / "q4_0" quantize every matrix
    at load with the gguf library's quantizer. Norms and unquantized tensors are dense in `dtype` always.
    `reader`: `path` already opened by open_gguf (its metadata parse costs seconds; the tokenizer reads it too)."""
    dtype = parse_dtype(dtype)
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such model folder or file")
    if weights is not None and weights not in WEIGHT_MODES:
        raise WeightsError(f"unknown weights mode {weights!r} (one of: {', '.join(WEIGHT_MODES)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path}: a model is a folder or a .gguf file")
        mode = weights or "packed"
        args, state = load_gguf(reader or open_gguf(path), dtype, packed=mode in PACKED_MODES,
                                quantize=QUANTIZE_AT_LOAD.get(mode), shard=shard)
        if mode == "packed-q8act":
            state = {k: w.with_q8_activations() if isinstance(w, PackedWeight) else w for k, w in state.items()}
        return args, state, "gguf"
    if weights in PACKED_MODES:
        raise WeightsError(f"{path}: --weights {weights} keeps the blocks of a .gguf file; quantize this checkpoint "
                           "at load with --weights q8_0 or q4_0")
    quantize = QUANTIZE_AT_LOAD.get(weights or "dequantize")
    if (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors")):
        return _load_hf(path, dtype, quantize, shard)
    if any(path.glob("consolidated.*.pth")):
        return _load_meta(path, dtype, quantize, shard)
    raise WeightsError(
        f"{path}: no weights found (expected *.safetensors with config.json, or consolidated.*.pth with params.json)"
    )


@dataclass
class _Tensors:
    """A checkpoint's tensors by their names in the file: the names, each one's shape as its headers say
    (given the shape the config implies, which says how Meta shards join; no data is read) and a reader."""

    names: set[str]
    shape: Callable[[str, tuple[int, ...]], tuple[int, ...]]
    read: Callable[[str, tuple[int, ...], "Cut | None"], Weight]  # the whole tensor, or the part a shard holds


def _printable(name: str) -> str:
    """A tensor or file name from a file, for a short one-line message."""
    return name if name.isprintable() and len(name) <= 100 else describe(name)


def _check_layer_count(args: ModelArgs, names: dict[str, str], present: set[str], where: Path) -> None:
    """The layers the config declares against the layers the weights hold."""
    prefix = names["layers.{i}.attention_norm.weight"].split("{i}")[0]
    held = {i for n in present if n.startswith(prefix) and (i := n[len(prefix):].split(".", 1)[0]).isdigit()}
    if len(held) != args.n_layers:
        raise WeightsError(f"{where}: the config declares {args.n_layers} layers but the weights hold {len(held)}")


def _check_shape(where: Path, file_name: str, got: tuple[int, ...], shape: tuple[int, ...], name: str) -> None:
    if got != shape:
        raise WeightsError(f"{where}: {file_name} has shape {got} but the config implies {shape} for {name}")


def _convert(
    args: ModelArgs, names: dict[str, str], tensors: _Tensors, dtype: torch.dtype, interleaved_qk: bool, where: Path,
    quantize: int | None = None, shard: Shard | None = None,
) -> dict[str, Weight]:
    """Check the layer count, every name and every shape against the config before reading anything;
    then read, un-permute and cast one tensor at a time (matrices quantized to `quantize`, a ggml type,
    if given); with `shard`, only its part of each (whole heads: un-permuted with its head count)."""
    _check_layer_count(args, names, tensors.names, where)
    shapes = expected_shapes(args)
    src = expand_names(names, args)
    missing = [s for s in src.values() if s not in tensors.names]
    if missing:
        raise WeightsError(f"{where}: {len(missing)} weights missing, e.g. {', '.join(missing[:3])}")
    known = set(src.values()) | ({names["output.weight"]} if args.tie_embeddings else set())  # tied: copy ignored
    extra = sorted(n for n in tensors.names - known if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise WeightsError(f"{where}: {len(extra)} unexpected weights, e.g. {', '.join(map(_printable, extra[:3]))}")
    for name, shape in shapes.items():
        _check_shape(where, src[name], tensors.shape(src[name], shape), shape, name)
    if shard is not None:
        shard.check(args)
    heads = shard.local_args(args) if shard else args
    out = {}
    for name, shape in shapes.items():
        cut = shard.cut(name, args) if shard else None
        t = tensors.read(src[name], shape, cut)
        # a reader's data can disagree with its header
        _check_shape(where, src[name], tuple(t.shape), shard.shape(name, args, shape) if shard else shape, name)
        if interleaved_qk and name.endswith(("wq.weight", "wk.weight")):
            t = unpermute_rope(t, heads.n_heads if name.endswith("wq.weight") else heads.n_kv_heads)
        if isinstance(t, PackedWeight):  # kept as the file's blocks
            out[name] = t
        elif quantize is not None and t.dim() == 2:
            out[name] = PackedWeight.quantize(t, quantize, dtype, f"{where}: {src[name]}")
        else:
            out[name] = t.to(dtype).contiguous()
    return out


# ---- Hugging Face: config.json + safetensors (single file or sharded with an index) ----

def _load_hf(folder: Path, dtype: torch.dtype, quantize: int | None, shard: Shard | None
             ) -> tuple[ModelArgs, dict[str, Weight], str]:
    from safetensors import SafetensorError, safe_open

    if not (folder / "config.json").exists():
        raise WeightsError(f"{folder}: safetensors weights but no config.json")
    args = load_config_json(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_index(index)
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (folder / f).is_file():
                raise WeightsError(f"{folder}: shard {_printable(f)} named in {index.name} is missing")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    handles = {}
    try:
        for f in files:
            handles[f] = safe_open(folder / f, framework="pt")
    except SafetensorError as e:
        raise WeightsError(f"{_printable(str(folder / f))}: corrupt or truncated safetensors file ({e})") from None
    if not index.exists():
        weight_map = {k: f for f, h in handles.items() for k in h.keys()}

    shapes = {k: tuple(h.get_slice(k).get_shape()) for f, h in handles.items() for k in h.keys()
              if weight_map.get(k) == f}

    def read(name: str, shape: tuple[int, ...], cut: Cut | None) -> torch.Tensor:
        try:
            if cut is None:
                return handles[weight_map[name]].get_tensor(name)
            return _slice(handles[weight_map[name]].get_slice(name), cut)  # only the shard's bytes are read
        except SafetensorError as e:
            raise WeightsError(f"{_printable(str(folder / weight_map[name]))}: cannot read {name} ({e})") from None

    tensors = _Tensors(set(shapes), lambda name, _: shapes[name], read)
    return args, _convert(args, HF_NAMES, tensors, dtype, False, folder, quantize, shard), "hf"


def read_index(index: Path) -> dict[str, str]:
    """A safetensors index's weight_map: an object of tensor name -> file, every file named inside the
    folder that holds the index (no absolute path, no "..": see `_not_a_name_inside`)."""
    src = Source(read_json(index, WeightsError), str(index), WeightsError)
    weight_map = src.data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise src.fail("weight_map", "an object of tensor name -> file name", weight_map)
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise src.fail(f"weight_map[{describe(name)}]", "a file name", file)
    for file in set(weight_map.values()):
        why = _not_a_name_inside(file)
        if why:
            raise WeightsError(f"{index}: weight_map names the file {describe(file)}, which {why}; "
                               f"an index may only name files inside its folder")
    return weight_map


def _not_a_name_inside(file: str) -> str | None:
    """Why `file`, named by an index, is not a file name inside the index's folder; None if it is one. The name
    is judged, not where a symlink in the folder points: the folder's owner put those there (a Hugging Face
    hub snapshot links every shard to ../../blobs), while the index is only data."""
    path = PurePath(file.replace("\\", "/"))  # a Windows separator counts too
    if not file.strip() or "\0" in file:
        return "is empty or holds a NUL byte"
    if path.is_absolute():
        return "is absolute"
    if ".." in path.parts:
        return "contains '..'"
    return None


def hf_config(args: ModelArgs) -> dict:
    """A config.json for `LlamaForCausalLM` (read by `load_config_json` and by transformers)."""
    rs = args.rope_scaling
    scaling = None if rs.type == "none" else {
        "rope_type": rs.type, "factor": rs.factor,
        **({"original_max_position_embeddings": rs.original_max_position_embeddings}
           if rs.original_max_position_embeddings else {}),
        **({"low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor}
           if rs.type == "llama3" else {}),
    }
    eos = list(args.eos_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": args.bos_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def save_hf_folder(
    args: ModelArgs, state_dict: dict[str, torch.Tensor], out_dir: str | Path, max_shard_bytes: int | None = None
) -> Path:
    """Write config.json + safetensors with HF names; shards with an index when `max_shard_bytes` is set."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hf: state_dict[name].contiguous() for name, hf in expand_names(HF_NAMES, args).items()}
    if max_shard_bytes is None:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for hf, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][hf] = t
            size += nbytes
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(args), indent=2) + "\n")
    return out


# ---- Meta: consolidated.*.pth (model-parallel shards) + params.json ----

def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        why = next((line for line in str(e).splitlines() if "GLOBAL" in line), "disallowed pickle content")
        raise WeightsError(f"{f}: refused, not a weights-only checkpoint ({why.strip()})") from None
    except (RuntimeError, EOFError) as e:
        why = str(e).splitlines()[0]
        raise WeightsError(f"{f}: not a zip-format torch checkpoint, corrupt or legacy ({why})") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise WeightsError(f"{f}: not a state dict of tensors")
    return sd


def _split_axis(first: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
    """The axis model-parallel slices join along: the first where a slice is smaller than the full tensor.

    Meta splits column-parallel weights (wq wk wv w1 w3 output) on dim 0, row-parallel ones (wo w2) on
    dim 1, the embedding on dim 1 (Llama 2) or dim 0 (Llama 3), and replicates the norms; the shapes
    say which, so one rule covers every version.
    """
    return next((a for a, n in enumerate(first) if a < len(shape) and n != shape[a]), None)


def _merged_shape(parts: list[tuple[int, ...]], shape: tuple[int, ...], name: str, folder: Path) -> tuple[int, ...]:
    """The shape `_merge_shards` will give, from the slices' shapes; slices that cannot join are refused."""
    first, axis = parts[0], _split_axis(parts[0], shape)
    if len(parts) == 1 or axis is None:
        return first
    others = {p[:axis] + p[axis + 1:] for p in parts if len(p) == len(first)}
    if len(others) != 1 or any(len(p) != len(first) for p in parts):
        raise WeightsError(f"{folder}: the consolidated shards disagree on the shape of {name}: {parts}")
    return first[:axis] + (sum(p[axis] for p in parts),) + first[axis + 1:]


def _merge_shards(parts: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Join model-parallel slices (see `_split_axis`)."""
    axis = _split_axis(tuple(parts[0].shape), shape)
    return parts[0] if len(parts) == 1 or axis is None else torch.cat(parts, dim=axis)


def _load_meta(folder: Path, dtype: torch.dtype, quantize: int | None, shard: Shard | None
               ) -> tuple[ModelArgs, dict[str, Weight], str]:
    params = folder / "params.json"
    if not params.exists():
        raise WeightsError(f"{folder}: consolidated.*.pth weights but no params.json")
    shards = [_torch_load(f) for f in sorted(folder.glob("consolidated.*.pth"))]
    embedding = shards[0].get("tok_embeddings.weight")
    vocab = embedding.shape[0] if embedding is not None and embedding.dim() else 0
    args = ModelArgs.from_meta_params(read_json(params), vocab_size=vocab, where=str(params))

    def parts(name: str) -> list[torch.Tensor]:
        if any(name not in s for s in shards):
            raise WeightsError(f"{folder}: {name} is missing from some consolidated shards")
        return [s[name] for s in shards]

    def shape(name: str, want: tuple[int, ...]) -> tuple[int, ...]:
        return _merged_shape([tuple(t.shape) for t in parts(name)], want, name, folder)

    def read(name: str, want: tuple[int, ...], cut: Cut | None) -> torch.Tensor:
        # memory-mapped: a slice of one file's tensor is read alone (files split on another axis are joined first)
        return _slice(_merge_shards(parts(name), want), cut)

    tensors = _Tensors(set().union(*(s.keys() for s in shards)), shape, read)
    return args, _convert(args, META_NAMES, tensors, dtype, True, folder, quantize, shard), "meta"


def _slice(t: Sliceable, cut: Cut | None) -> Sliceable:
    """A shard's rows or columns of a dense tensor, an array (views: nothing is read until copied) or a
    safetensors slice (which reads only those bytes)."""
    if cut is None:
        return t
    return t[cut.start : cut.stop] if cut.axis == 0 else t[:, cut.start : cut.stop]


# ---- GGUF (llama.cpp): metadata + (quantized) tensors ----

def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06); one a
    float32 cannot hold (a FLOAT64 key) stays as it is."""
    import numpy as np

    return float(str(np.float32(x))) if abs(x) <= np.finfo(np.float32).max else x


def gguf_model_args(reader: gguf.GGUFReader) -> ModelArgs:
    """ModelArgs from GGUF `llama.*` metadata; embeddings are tied when the file has no output.weight."""
    src = gguf_source(reader)
    arch = src.data.get("general.architecture")
    if arch != "llama":
        raise WeightsError(f"{src.where}: unsupported GGUF architecture {describe(arch)} (supported: llama)")
    kw = src.numbers(GGUF_FIELDS, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096, head_dim=0, bos_id=None)
    if "llama.vocab_size" in src.data:
        vocab = src.number("llama.vocab_size", LIMITS["vocab_size"])
    else:
        vocab = len(src.array("tokenizer.ggml.tokens", str))
    scaling = src.text("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ConfigError(f"{src.where}: unsupported GGUF rope scaling {describe(scaling)} (none, linear)")
    scaling_args = dict(
        type=scaling,
        factor=_f32(src.number("llama.rope.scaling.factor", ROPE_LIMITS["factor"], 1.0)),
        original_max_position_embeddings=src.number(
            "llama.rope.scaling.original_context_length", ROPE_LIMITS["original_max_position_embeddings"], None),
    )
    return src.build(
        ModelArgs,
        **kw | {"norm_eps": _f32(kw["norm_eps"]), "rope_theta": _f32(kw["rope_theta"])},
        n_kv_heads=src.number("llama.attention.head_count_kv", LIMITS["n_kv_heads"], kw["n_heads"]),
        vocab_size=vocab,
        rope_scaling=src.build(RopeScaling, **scaling_args),
        tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
        eos_ids=src.ids("tokenizer.ggml.eos_token_id", ()),
    )


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A memory-mapped GGUF reader, or a WeightsError saying why the file cannot be read."""
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        """gguf's reader, parsing through a plain ndarray view of its memory map: each slice of a np.memmap
        runs Python code, and a 49K-token vocabulary is ~500K slices (4x faster; `data` is the memmap after)."""

        def __init__(self, path: str | Path):
            self._parsing = True
            super().__init__(path)
            self._parsing = False

        @property
        def data(self) -> np.ndarray:
            return self._plain if self._parsing else self._memmap

        @data.setter
        def data(self, value: np.memmap) -> None:
            self._memmap, self._plain = value, value.view(np.ndarray)

    try:
        return Reader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise WeightsError(f"{path}: not a readable GGUF file ({e})") from None


def load_gguf(
    reader: gguf.GGUFReader, dtype: str | torch.dtype = torch.float32, packed: bool = False,
    quantize: int | None = None, shard: Shard | None = None,
) -> tuple[ModelArgs, dict[str, Weight]]:
    """An opened GGUF file as (args, internal state dict), q/k un-permuted: quantized matrices dequantized
    to `dtype`, or with `packed` kept as their blocks (engine.quant.PackedWeight; a type without kernels
    is refused, never dequantized behind the caller's back), or requantized to `quantize`."""
    import gguf

    where = Path(reader.data.filename)
    args = gguf_model_args(reader)
    tensors = {t.name: t for t in reader.tensors}
    for name in expand_names(GGUF_NAMES, args).values():
        t = tensors.get(name)
        if t is not None and t.tensor_type.name not in GGUF_TYPES:
            raise WeightsError(
                f"{where}: {name} has unsupported GGUF tensor type {t.tensor_type.name} "
                f"(supported: {', '.join(GGUF_TYPES)})"
            )
    dense_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    dtype = parse_dtype(dtype)

    def read(name: str, shape: tuple[int, ...], cut: Cut | None) -> Weight:
        t, what = tensors[name], f"{where}: {name}"
        if t.tensor_type in dense_types:
            return torch.tensor(gguf.quants.dequantize(_slice(t.data, cut), t.tensor_type))
        if not packed and cut is not None and not on_block_boundaries(int(t.tensor_type), cut):
            whole = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))  # this tensor, then its columns
            return _slice(whole, cut).clone()
        blocks, K = packed_part(t.data, int(t.tensor_type), shape[-1], cut, what)
        if packed:
            return PackedWeight.from_blocks(blocks, int(t.tensor_type), K, dtype, what)
        return torch.tensor(gguf.quants.dequantize(blocks, t.tensor_type))  # [out, in]; copies off the mmap

    shapes = {name: tuple(int(n) for n in reversed(t.shape.tolist())) for name, t in tensors.items()}  # ggml: [in, out]
    found = _Tensors(set(tensors), lambda name, _: shapes[name], read)
    return args, _convert(args, GGUF_NAMES, found, dtype, True, where, quantize, shard)


def on_block_boundaries(qtype: int, cut: Cut) -> bool:
    """Whether a row-parallel cut falls between the quantized blocks of a row (a column cut always does)."""
    import gguf

    per_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)][0]
    return cut.axis == 0 or (cut.start % per_block == 0 and cut.stop % per_block == 0)


def packed_part(blocks: np.ndarray, qtype: int, K: int, cut: Cut | None, what: str) -> tuple[np.ndarray, int]:
    """A shard's part of a matrix kept as quantized blocks ([out rows, row bytes], a view of the mapped file)
    and its row width: a column-parallel cut takes whole rows, a row-parallel one the bytes of whole blocks
    (a cut inside a block is refused: the caller dequantizes instead, or the user is told how)."""
    import gguf

    if cut is None:
        return blocks, K
    if cut.axis == 0:
        return blocks[cut.start : cut.stop], K
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    if not on_block_boundaries(qtype, cut):
        raise WeightsError(f"{what}: its {gguf.GGMLQuantizationType(qtype).name} blocks of {per_block} weights do "
                           f"not split into this rank's columns [{cut.start}, {cut.stop}); use another number of "
                           f"ranks or load with --weights dequantize")
    lo, hi = cut.start // per_block * block_bytes, cut.stop // per_block * block_bytes
    return blocks[:, lo:hi], cut.stop - cut.start
