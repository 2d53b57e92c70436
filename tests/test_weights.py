"""Checkpoint loading (HF, Meta, GGUF), the q/k RoPE layouts, bad inputs, and the default-model fetch."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from engine.config import ModelArgs
from engine.quant import PackedWeight
from engine.fetch import DEFAULT_MODEL, GGUF_FILE, PACKAGE_MODULE, convert_gguf, resolve_model, weights_dir
from engine.tokenizer import TokenizerError
from engine.weights import (
    WeightsError, expected_shapes, gguf_model_args, load_checkpoint, save_hf_folder, unpermute_rope,
)

from .helpers import random_state, tiny_args

Q = gguf.GGMLQuantizationType


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """rotate_half rows -> interleaved-pair rows, by explicit indices (independent of unpermute_rope)."""
    hd = w.shape[0] // n_heads
    rows = [h * hd + half * (hd // 2) + j for h in range(n_heads) for j in range(hd // 2) for half in (0, 1)]
    return w[rows]


def qk_heads(name: str, args: ModelArgs) -> int | None:
    if name.endswith("wq.weight"):
        return args.n_heads
    return args.n_kv_heads if name.endswith("wk.weight") else None


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, name
        err = (g.float() - w.float()).norm() / w.float().norm()
        assert err <= rel, f"{name}: relative error {err:.3g} > {rel}"


# ---- the RoPE permutation ----

def test_unpermute_rope_moves_interleaved_pairs_to_halves():
    w = torch.arange(16.0)[:, None].repeat(1, 3)  # 2 heads x head_dim 8; row r holds the value r
    assert unpermute_rope(w, 2)[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]


def test_permutation_both_ways():
    w = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_rope(to_interleaved(w, 4), 4), w)
    assert torch.equal(to_interleaved(unpermute_rope(w, 4), 4), w)


def test_unpermuted_weights_give_same_attention_scores_under_each_rope():
    """Meta's complex (interleaved) RoPE on Meta weights == HF rotate_half RoPE on converted weights."""
    n_heads, hd, dim, T = 2, 8, 16, 5
    x, wq, wk = torch.randn(T, dim, dtype=torch.float64), torch.randn(n_heads * hd, dim, dtype=torch.float64), \
        torch.randn(n_heads * hd, dim, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, hd, 2) / hd)  # [T, hd/2]

    def meta_rope(w):
        y = (x @ w.T).view(T, n_heads, hd // 2, 2)
        return torch.view_as_real(torch.view_as_complex(y) * torch.polar(torch.ones_like(angle), angle)[:, None])

    def hf_rope(w):
        y = (x @ w.T).view(T, n_heads, hd)
        cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
        return y * cos + torch.cat([-y[..., hd // 2:], y[..., : hd // 2]], -1) * sin

    meta = torch.einsum("thd,shd->hts", meta_rope(wq).flatten(2), meta_rope(wk).flatten(2))
    hf = torch.einsum("thd,shd->hts", hf_rope(unpermute_rope(wq, n_heads)), hf_rope(unpermute_rope(wk, n_heads)))
    torch.testing.assert_close(hf, meta, rtol=1e-12, atol=1e-12)
    wrong = torch.einsum("thd,shd->hts", hf_rope(wq), hf_rope(wk))
    assert not torch.allclose(wrong, meta, atol=1e-3)


# ---- Hugging Face folders ----

@pytest.mark.parametrize("tie", [False, True])
def test_hf_single_file_round_trip(tmp_path, tie):
    args = tiny_args(tie_embeddings=tie)
    sd = random_state(args)
    save_hf_folder(args, sd, tmp_path)
    got_args, got, fmt = load_checkpoint(tmp_path)
    assert fmt == "hf" and got_args == args
    assert ("output.weight" in got) != tie
    assert_same(got, sd)


def test_hf_sharded_round_trip_and_dtype(tmp_path):
    args = tiny_args()
    sd = random_state(args)
    save_hf_folder(args, sd, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    _, got, fmt = load_checkpoint(tmp_path)
    assert fmt == "hf"
    assert_same(got, sd)
    _, half, _ = load_checkpoint(tmp_path, dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert torch.equal(half["norm.weight"], sd["norm.weight"].bfloat16())


def test_hf_ignores_rotary_buffers_but_not_unknown_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    args = tiny_args()
    save_hf_folder(args, random_state(args), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, tmp_path / "model.safetensors")
    load_checkpoint(tmp_path)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.ones(64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"1 unexpected weights, e\.g\. model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_checkpoint(tmp_path)
    del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"1 weights missing, e\.g\. model\.norm\.weight"):
        load_checkpoint(tmp_path)


# ---- Meta folders ----

META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
               "vocab_size": -1}
# Meta's model parallelism: column-parallel on dim 0, row-parallel on dim 1, embedding (Llama 2) on dim 1.
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def write_meta(folder: Path, args: ModelArgs, sd: dict[str, torch.Tensor], n_shards: int) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "params.json").write_text(json.dumps(META_PARAMS))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        heads = qk_heads(name, args)
        t = to_interleaved(t, heads) if heads else t
        axis = META_SPLIT.get(name.split(".")[-2])
        for k in range(n_shards):
            shards[k][name] = t.clone() if axis is None else t.chunk(n_shards, axis)[k].clone()
    for k, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_folder_loads_to_hf_layout(tmp_path, n_shards):
    args = ModelArgs.from_meta_params(META_PARAMS, vocab_size=128)
    assert args.hidden_dim == 192
    sd = random_state(args)
    write_meta(tmp_path, args, sd, n_shards)
    got_args, got, fmt = load_checkpoint(tmp_path)
    assert fmt == "meta" and got_args == args
    assert_same(got, sd)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_meta_refuses_pickles_with_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS))
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": _Evil(marker)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(WeightsError, match=r"consolidated\.00\.pth: refused, not a weights-only checkpoint"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_meta_legacy_or_corrupt_pth(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS))
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"consolidated\.00\.pth: not a zip-format torch checkpoint"):
        load_checkpoint(tmp_path)


# ---- GGUF files ----

def write_gguf(path: Path, args: ModelArgs, sd: dict[str, torch.Tensor], qtype, odd: dict | None = None) -> Path:
    """A llama GGUF written the way llama.cpp's converter does (q/k interleaved, norms F32).

    `odd` maps a GGUF tensor name to a (raw bytes, tensor type) pair written instead.
    """
    gguf_names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                  "output.weight": "output.weight"}
    layer_names = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
                   "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
                   "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)
    w.add_bos_token_id(args.bos_id)
    w.add_eos_token_id(args.eos_ids[0])
    for name, t in sd.items():
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            gname = f"blk.{i}.{layer_names[rest.removesuffix('.weight')]}.weight"
        else:
            gname = gguf_names[name]
        heads = qk_heads(name, args)
        a = (to_interleaved(t, heads) if heads else t).numpy()
        if odd and gname in odd:
            w.add_tensor(gname, odd[gname][0], raw_dtype=odd[gname][1])
        elif a.ndim == 1:
            w.add_tensor(gname, a)
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype, rel", [("F32", 0.0), ("F16", 1e-3), ("BF16", 5e-3), ("Q8_0", 1e-2),
                                        ("Q4_0", 0.15), ("Q4_1", 0.15)])
def test_gguf_loads_to_hf_layout(tmp_path, qtype, rel):
    """Equal to the HF layout within the quantization error (a wrong q/k permutation gives error ~1.4)."""
    args = tiny_args()
    sd = random_state(args)
    path = write_gguf(tmp_path / "m.gguf", args, sd, Q[qtype])
    got_args, got, fmt = load_checkpoint(path, weights="dequantize")
    assert fmt == "gguf" and got_args == args
    assert_same(got, sd, rel)
    _, packed, _ = load_checkpoint(path)  # packed by default: the same weights, held as the file's blocks
    for name, w in packed.items():
        dense = w.dequantize() if isinstance(w, PackedWeight) else w
        assert isinstance(w, PackedWeight) == (qtype.startswith("Q") and got[name].dim() == 2), name
        assert torch.equal(dense, got[name]), name


def test_gguf_without_output_is_tied(tmp_path):
    args = tiny_args(tie_embeddings=True)
    path = write_gguf(tmp_path / "m.gguf", args, random_state(args), Q.F32)
    assert gguf_model_args(gguf.GGUFReader(path)).tie_embeddings
    got_args, got, _ = load_checkpoint(path)
    assert got_args.tie_embeddings and "output.weight" not in got


def test_gguf_unsupported_quant_type(tmp_path):
    args = tiny_args()
    raw = np.zeros((args.hidden_dim, args.dim // 32 * 18), dtype=np.uint8)  # IQ4_NL: 18 bytes per 32 weights
    path = write_gguf(tmp_path / "m.gguf", args, random_state(args), Q.F32,
                      odd={"blk.1.ffn_up.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(WeightsError, match=r"blk\.1\.ffn_up\.weight has unsupported GGUF tensor type IQ4_NL "
                                           r"\(supported: F32, F16, BF16, Q4_0, Q4_1, .*Q8_0"):
        load_checkpoint(path)


def test_gguf_truncated(tmp_path):
    args = tiny_args()
    path = write_gguf(tmp_path / "m.gguf", args, random_state(args), Q.F32)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=r"m\.gguf: not a readable GGUF file"):
        load_checkpoint(path)


# ---- bad inputs ----

def test_missing_folder_and_folder_without_weights(tmp_path):
    with pytest.raises(WeightsError, match=r"nope: no such model folder or file"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"no weights found \(expected \*\.safetensors"):
        load_checkpoint(tmp_path)


def test_missing_shard(tmp_path):
    args = tiny_args()
    save_hf_folder(args, random_state(args), tmp_path, max_shard_bytes=60_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=rf"shard {shard.name} named in model\.safetensors\.index\.json is missing"):
        load_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path):
    args = tiny_args()
    save_hf_folder(args, random_state(args), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        load_checkpoint(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    args = tiny_args()
    save_hf_folder(args, random_state(args), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(96, 64\) "
                                           r"but the config implies \(128, 64\)"):
        load_checkpoint(tmp_path)


def test_unknown_dtype(tmp_path):
    args = tiny_args()
    save_hf_folder(args, random_state(args), tmp_path)
    with pytest.raises(WeightsError, match=r"unknown dtype 'float8' \(one of: float32"):
        load_checkpoint(tmp_path, dtype="float8")


# ---- model names and the fetch ----

def test_weights_dir_and_resolve_model(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_WEIGHTS", raising=False)
    import engine

    assert weights_dir() == Path(engine.__file__).resolve().parent.parent / "weights"
    monkeypatch.setenv("ENGINE_WEIGHTS", str(tmp_path))
    assert weights_dir() == tmp_path
    (tmp_path / "mine").mkdir()
    assert resolve_model("mine") == tmp_path / "mine"
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(WeightsError, match=rf"unknown model 'other' \(known: mine, {DEFAULT_MODEL}\); "
                                           r"a model folder or \.gguf path also works"):
        resolve_model("other")
    with pytest.raises(WeightsError, match=r"no such model folder or file"):
        resolve_model(str(tmp_path / "gone" / "model.gguf"))


def test_convert_leaves_nothing_behind_on_a_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_WEIGHTS", str(tmp_path / "w"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(WeightsError, match=r"bad\.gguf: not a readable GGUF file"):
        convert_gguf(bad, weights_dir() / "m", progress=lambda _: None)
    assert list((tmp_path / "w").iterdir()) == []


def test_convert_leaves_nothing_behind_when_failing_midway(tmp_path, monkeypatch):
    """A valid GGUF without tokenizer metadata fails after the weights were written: no partial folder."""
    monkeypatch.setenv("ENGINE_WEIGHTS", str(tmp_path / "w"))
    args = tiny_args()
    path = write_gguf(tmp_path / "m.gguf", args, random_state(args), Q.F32)
    stages: list[str] = []
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        convert_gguf(path, weights_dir() / "m", progress=stages.append)
    assert stages[-1] == "writing tokenizer files"
    assert list((tmp_path / "w").iterdir()) == []


# ---- the real default model ----

@pytest.fixture(scope="module")
def default_folder() -> Path:
    return resolve_model(DEFAULT_MODEL)  # converted once into weights/, then cached there


@pytest.fixture(scope="module")
def default_checkpoint(default_folder):
    return load_checkpoint(default_folder)


def default_gguf() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec(PACKAGE_MODULE).submodule_search_locations[0]) / GGUF_FILE


def test_default_model_folder(default_folder, default_checkpoint):
    args, sd, fmt = default_checkpoint
    assert fmt == "hf"
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim, args.vocab_size) == \
        (576, 30, 9, 3, 1536, 49152)
    assert (args.rope_theta, args.max_seq_len, args.norm_eps, args.bos_id, args.eos_ids) == \
        (100000.0, 8192, 1e-5, 1, (2,))
    assert args.tie_embeddings and "output.weight" not in sd
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(args)
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert json.loads((default_folder / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((default_folder / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (default_folder / "tokenizer.json").is_file()


def test_default_model_matches_its_gguf(default_checkpoint):
    """q/k were un-permuted (re-interleaving gives the GGUF's dequantized rows exactly); v was not touched."""
    args, sd, _ = default_checkpoint
    tensors = {t.name: t for t in gguf.GGUFReader(default_gguf()).tensors}
    for name, gname, heads in [("layers.7.attention.wq.weight", "blk.7.attn_q.weight", 9),
                               ("layers.7.attention.wk.weight", "blk.7.attn_k.weight", 3),
                               ("layers.7.attention.wv.weight", "blk.7.attn_v.weight", None),
                               ("tok_embeddings.weight", "token_embd.weight", None)]:
        t = tensors[gname]
        want = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))
        assert torch.equal(to_interleaved(sd[name], heads) if heads else sd[name], want), name


def test_transformers_reads_the_default_folder(default_folder, default_checkpoint):
    """Our config.json and HF names are what transformers expects (it is only a test oracle)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.config.rope_parameters["rope_theta"] == 100000.0
    _, sd, _ = default_checkpoint
    hf = model.state_dict()
    assert torch.equal(hf["model.layers.3.self_attn.k_proj.weight"], sd["layers.3.attention.wk.weight"])
    assert torch.equal(hf["lm_head.weight"], sd["tok_embeddings.weight"])
