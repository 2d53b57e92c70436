"""Our forward pass against transformers' LlamaForCausalLM (the oracle), and cached decode against recompute."""
from __future__ import annotations

import pytest
import torch

from engine.kv import KVStore
from engine.decode import decode_step
from engine.generate import prefill
from engine.model import Transformer
from engine.rope import Rope
from engine.policies import Full
from engine.weights import load_checkpoint

transformers = pytest.importorskip("transformers")

ROPES = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


def tiny_hf(tmp_path, n_kv_heads: int, tied: bool, rope: str, max_pos: int = 64, seed: int = 0):
    """A random tiny LlamaForCausalLM saved as an HF folder, loaded back through our weight loader."""
    torch.manual_seed(seed)
    params = {"rope_theta": 10000.0, "rope_type": "default"} if ROPES[rope] is None else {"rope_theta": 10000.0, **ROPES[rope]}
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=96, intermediate_size=136, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=n_kv_heads, max_position_embeddings=max_pos, tie_word_embeddings=tied,
        rope_parameters=params, rms_norm_eps=1e-5,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1: make them random so a wrong norm shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    args, state, fmt = load_checkpoint(tmp_path)
    assert fmt == "hf"
    return hf, Transformer.from_state_dict(args, state, "cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("n_kv_heads,tied", [(6, False), (2, False), (3, True)])
def test_logits_match_transformers(tmp_path, rope, n_kv_heads, tied):
    hf, ours = tiny_hf(tmp_path, n_kv_heads, tied, rope)
    T = 80 if rope == "dynamic" else 48  # dynamic NTK only acts past max_position_embeddings
    ids = torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert rel_err(got, want) <= 1e-4


def test_cached_decode_equals_recompute(tmp_path):
    """64 greedy steps: each cached decode step's logits equal a full forward over everything so far."""
    _, model = tiny_hf(tmp_path, 2, False, "none", max_pos=128)
    model.rope = Rope(model.args, torch.device("cpu"))
    ids = torch.randint(0, 101, (1, 17), generator=torch.Generator().manual_seed(2))
    store = KVStore(model.args, Full(budget=128), 128, 128, 1, torch.float32, torch.device("cpu"), model.rope)
    logits = prefill(model, store, ids)
    with torch.no_grad():
        assert rel_err(logits, model(ids)[:, -1]) <= 1e-5
        for _ in range(64):
            token = logits.argmax(-1)
            ids = torch.cat([ids, token[:, None]], dim=1)
            logits = decode_step(model, store, token)
            full = model(ids)[:, -1]
            # different kernels (fused decode attention vs SDPA) sum in another order: a stated tight tolerance
            assert rel_err(logits, full) <= 1e-5
            assert torch.equal(logits.argmax(-1), full.argmax(-1))


def test_chunked_prefill_equals_one_shot(tmp_path):
    _, model = tiny_hf(tmp_path, 3, True, "none", max_pos=128)
    model.rope = Rope(model.args, torch.device("cpu"))
    ids = torch.randint(0, 101, (2, 50), generator=torch.Generator().manual_seed(3))
    store = KVStore(model.args, Full(budget=64), 64, 64, 2, torch.float32, torch.device("cpu"), model.rope)
    got = prefill(model, store, ids, chunk=7, all_logits=True)
    with torch.no_grad():
        assert rel_err(got, model(ids)) <= 1e-5


def test_building_the_model_imports_no_compiler_stack(tmp_path):
    """from_state_dict builds on the meta device: a random init there (Embedding's normal_) runs torch._refs and
    imports torch._dynamo and sympy, ~70 MB of a chat's peak RSS for nothing (the weights are assigned)."""
    import subprocess
    import sys

    tiny_hf(tmp_path, n_kv_heads=2, tied=True, rope="none")
    code = ("import sys; from engine.model import Transformer; from engine.weights import load_checkpoint; "
            "args, state, _ = load_checkpoint(sys.argv[1]); Transformer.from_state_dict(args, state, 'cpu'); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
