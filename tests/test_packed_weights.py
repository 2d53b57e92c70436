"""Packed quantized weights end to end: loading (GGUF blocks kept, q8_0/q4_0 quantized at load), the model on
them against the same weights dequantized (only the summation order may differ), every policy on a packed
model, the decode plan, prompt GEMM tiles, and one clear line for each weight that cannot be kept packed."""
from __future__ import annotations

import gguf
import pytest
import torch

import engine
from engine import ops, quant
from engine.decode import Decoder, decode_step
from engine.generate import prefill
from engine.llm import LLM
from engine.model import Transformer
from engine.policies import list_policies, make_policy
from engine.quant import PackedWeight, QuantError
from engine.weights import WeightsError, load_checkpoint, save_hf_folder

from .helpers import packed_twin, random_state, small, tiny_args, tiny_model, token_ids

Q = gguf.GGMLQuantizationType
EVICTING = [n for n in list_policies() if n != "full"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run(model: Transformer, policy, prompt: torch.Tensor, ids: torch.Tensor, mask: bool = False):
    """Prefill `prompt` then decode `ids` (teacher forcing): logits (n + 1, V) and the store."""
    store = LLM(model, None, policy, mask=mask).new_store(prompt.shape[1], ids.shape[1] + 1)
    out = [prefill(model, store, prompt)]
    out += [decode_step(model, store, ids[:, i]) for i in range(ids.shape[1])]
    return torch.cat(out), store


MIXES = {"q8_0": {"": Q.Q8_0}, "q4_0": {"": Q.Q4_0}, "q4_1": {"": Q.Q4_1},
         # a fused q/k/v and gate/up of two types, as a Q4_K_M file holds them (tiny widths: no K-quants here)
         "mixed": {"": Q.Q4_0, "wv.weight": Q.Q8_0, "w3.weight": Q.Q4_1}}


@pytest.mark.parametrize("mix", MIXES)
def test_packed_model_equals_its_dequantized_weights(mix):
    packed, dense = packed_twin(tiny_model(), MIXES[mix])
    prompt, ids = token_ids(30, seed=3), token_ids(12, seed=4)
    got, _ = run(packed, make_policy("full"), prompt, ids)
    want, _ = run(dense, make_policy("full"), prompt, ids)
    assert rel_err(got, want) < 1e-5
    if mix == "mixed":
        assert len(packed.layers[0].attention.wqkv.parts) == 2 and len(packed.layers[0].feed_forward.w13.parts) == 2


@pytest.mark.parametrize("q8", [False, True])
@pytest.mark.parametrize("mix", ["q4_1", "mixed"])
def test_decode_plan_on_packed_weights_equals_the_modules(mix, q8):
    """The CPU plan binds the packed products once; bit-equal to the modules' ops.linear calls (with 8-bit
    activations too: both call qmatvec_q8)."""
    packed, _ = packed_twin(tiny_model(), MIXES[mix], q8_activations=q8)
    prompt, ids = token_ids(20, seed=5), token_ids(10, seed=6)
    logits = []
    for hook in (False, True):  # a forward hook sends the steps through the modules
        handle = packed.register_forward_hook(lambda *a: None) if hook else None
        store = LLM(packed, None, make_policy("h2o", budget=16)).new_store(20, 11)
        prefill(packed, store, prompt)
        decoder = Decoder(packed, store)
        assert decoder.path() == ("modules" if hook else "plan")
        logits.append(torch.stack([decoder.step(ids[:, i]) for i in range(10)]))
        if handle:
            handle.remove()
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("name", EVICTING)
def test_every_policy_on_packed_weights(name, positions):
    """Drop equals mask on a packed model, and it keeps what the dense model of the same weights keeps."""
    packed, dense = packed_twin(tiny_model(), MIXES["q4_0"])
    prompt, ids = token_ids(40, seed=2), token_ids(40, seed=7)
    drop, store = run(packed, small(name, 16, positions=positions), prompt, ids)
    masked, _ = run(packed, small(name, 16, positions=positions), prompt, ids, mask=True)
    want, want_store = run(dense, small(name, 16, positions=positions), prompt, ids)
    assert store.stats().evictions > 0
    assert rel_err(drop, masked) <= 1e-4
    assert rel_err(drop, want) <= 1e-4
    kept = sum(torch.equal(a.pos, b.pos) for a, b in zip(store.layers, want_store.layers))
    assert kept == len(store.layers), "a near-tie flipped by summation order changed what is kept"


def test_prompt_gemm_tiles(monkeypatch):
    """A prompt multiplies by tiles of dequantized rows; awkward tile sizes give the same product."""
    packed, dense = packed_twin(tiny_model(), MIXES["mixed"])
    prompt = token_ids(33, seed=8)
    want = dense(prompt)
    for rows in (7, 50, 4096):
        monkeypatch.setattr(quant, "TILE_ROWS", rows)
        assert rel_err(packed(prompt), want) < 1e-5


def test_packed_embedding_dequantizes_the_rows_looked_up():
    packed, dense = packed_twin(tiny_model(), MIXES["q8_0"])
    ids = token_ids(17, seed=9, batch=2)
    got = ops.embedding(ids, packed.tok_embeddings.weight)
    assert got.shape == (2, 17, 64)
    assert torch.equal(got, torch.nn.functional.embedding(ids, dense.tok_embeddings.weight))


@pytest.mark.parametrize("mode", ["q8_0", "q4_0"])
def test_quantize_at_load_gives_the_gguf_quantizer_blocks(tmp_path, mode):
    args = tiny_args()
    state = random_state(args)
    folder = save_hf_folder(args, state, tmp_path / "m")
    _, got, fmt = load_checkpoint(folder, weights=mode)
    qtype = quant.QUANTIZE_AT_LOAD[mode]
    for name, w in state.items():
        if w.dim() == 2:
            (part,) = got[name].parts
            want = gguf.quants.quantize(w.float().numpy(), Q(qtype))
            assert part.qtype == qtype and torch.equal(part.blocks, torch.from_numpy(want)), name
        else:
            assert torch.equal(got[name], w), name


def test_default_model_packed_matches_dequantized(default_model_dir, smollm):
    """The default model from its Q4_1 GGUF, blocks kept: its logits on real text equal the dequantized fp32
    model's within 1e-4 relative (the same weights; only the summation order differs)."""
    llm = engine.load("smollm2-135m-instruct")
    assert llm.weights == "packed" and llm.source.suffix == ".gguf"
    assert {p.qtypes for p in (llm.model.layers[0].attention.wqkv, llm.model.output.weight)} == {("Q4_1",), ("Q8_0",)}
    text = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
            "had taught him, and lit the lamp that guided the fishing boats home through the fog.")
    ids = torch.tensor([smollm.tokenizer.encode(text, bos=smollm.tokenizer.add_bos)])
    prompt, cont = ids[:, :24], ids[:, 24:40]
    for policy in (make_policy("full"), make_policy("h2o", budget=16)):
        got, _ = run(llm.model, policy, prompt, cont)
        want, _ = run(smollm.model, policy, prompt, cont)
        assert rel_err(got, want) < 1e-4, policy.name
    assert llm.generate("The capital of France is", max_new_tokens=6) == smollm.generate(
        "The capital of France is", max_new_tokens=6)


def test_default_model_with_q8_activations(default_model_dir, smollm):
    """--weights packed-q8act: the same blocks, products of up to 8 rows with 8-bit activations (a prompt's
    GEMM stays exact). The logits stay near the dequantized model's on real text but are not its numbers up to
    summation order (measured: ~1e-2 relative; exact packed below 1e-4). Greedy text agrees for a while
    (here 4 tokens, then " The United" where the fp32 model says " The answer")."""
    llm = engine.load("smollm2-135m-instruct", weights="packed-q8act")
    assert llm.weights == "packed-q8act" and llm.model.output.weight.q8_activations
    text = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
            "had taught him, and lit the lamp that guided the fishing boats home through the fog.")
    ids = torch.tensor([smollm.tokenizer.encode(text, bos=smollm.tokenizer.add_bos)])
    prompt, cont = ids[:, :24], ids[:, 24:40]
    got, _ = run(llm.model, make_policy("full"), prompt, cont)
    want, _ = run(smollm.model, make_policy("full"), prompt, cont)
    err = rel_err(got, want)
    assert 1e-4 < err < 0.05, err
    assert llm.generate("The capital of France is", max_new_tokens=4) == smollm.generate(
        "The capital of France is", max_new_tokens=4) == " Paris.\n\n"


# ---- what cannot be kept packed: one line naming the type and the way out ---------------------------

def test_packed_asked_of_a_folder(tmp_path):
    args = tiny_args()
    folder = save_hf_folder(args, random_state(args), tmp_path / "m")
    with pytest.raises(WeightsError, match=r"--weights packed keeps the blocks of a \.gguf file; .*q8_0 or q4_0"):
        load_checkpoint(folder, weights="packed")
    with pytest.raises(WeightsError, match=r"--weights packed-q8act keeps the blocks of a \.gguf file"):
        load_checkpoint(folder, weights="packed-q8act")
    with pytest.raises(WeightsError,
                       match=r"unknown weights mode 'q2' \(one of: packed, packed-q8act, dequantize, q8_0, q4_0\)"):
        load_checkpoint(folder, weights="q2")


def test_rows_that_are_not_whole_blocks(tmp_path):
    args = tiny_args(dim=48, n_heads=4, n_kv_heads=2, hidden_dim=96)  # 48 weights per row: 1.5 blocks of 32
    folder = save_hf_folder(args, random_state(args), tmp_path / "m")
    with pytest.raises(QuantError, match=r"rows of 48 weights are not whole Q8_0 blocks of 32; "
                                         r"load with --weights dequantize"):
        load_checkpoint(folder, weights="q8_0")


def test_a_type_without_kernels_is_refused_not_dequantized(tmp_path):
    from .test_weights import write_gguf

    args = tiny_args()
    path = write_gguf(tmp_path / "m.gguf", args, random_state(args), Q.Q5_0)
    with pytest.raises(QuantError, match=r"quant type Q5_0 is not kept packed \(supported: .*Q4_0.*\); "
                                         r"load with --weights dequantize"):
        load_checkpoint(path)
    _, state, _ = load_checkpoint(path, weights="dequantize")  # the way out works
    assert all(isinstance(w, torch.Tensor) for w in state.values())


def test_packed_on_the_cpu_computes_in_float32():
    with pytest.raises(WeightsError, match=r"--weights packed computes in float32 on the CPU .*--weights dequantize"):
        engine.load("smollm2-135m-instruct", dtype="bfloat16")
