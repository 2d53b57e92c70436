"""The CPU decode plan against the module path it mirrors: the same logits and the same cache, bit for
bit, every step, for every policy; and the module path wherever the plan must not run."""
from __future__ import annotations

import copy

import pytest
import torch

from engine import ops
from engine.decode import Decoder, decode_step
from engine.generate import prefill
from engine.llm import LLM
from engine.policies import list_policies

from .helpers import small, tiny_model, token_ids

pytestmark = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="the plan binds the compiled matvec")


def _module_step(model, store, token):
    """decode_step through the modules: a forward hook anywhere in the model keeps the plan out."""
    fired = []
    handle = model.layers[-1].register_forward_hook(lambda *_: fired.append(1))
    try:
        logits = decode_step(model, store, token)
    finally:
        handle.remove()
    assert fired, "the module path did not run"
    return logits


def _stores(model, policy, prompt, steps, kv_dtype=None):
    llm = LLM(model, None, policy, kv_dtype=kv_dtype)
    stores = [llm.new_store(prompt.shape[1], steps + 1, batch=prompt.shape[0]) for _ in range(2)]
    return [prefill(model, s, prompt) for s in stores], stores


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("name", list_policies())
def test_plan_equals_module_path(name, positions, batch):
    """Greedy decoding past the budget (evictions, merges, layer-by-layer policies): every step's logits
    and, at the end, every buffer of the store (K, V, positions, policy state) equal the module path's."""
    if name == "full" and positions == "cache":
        pytest.skip("full keeps original positions")
    model, prompt, steps = tiny_model(n_layers=3), token_ids(14, seed=5, batch=batch), 30
    policy = small(name, 12, positions=positions) if name != "full" else small(name, 64)
    (plan_logits, module_logits), (plan_store, module_store) = _stores(model, policy, prompt, steps)
    assert torch.equal(plan_logits, module_logits)
    for _ in range(steps):
        token = module_logits.argmax(-1)
        plan_logits = decode_step(model, plan_store, token)
        module_logits = _module_step(model, module_store, token)
        assert torch.equal(plan_logits, module_logits)
    for a, b in zip(plan_store.layers, module_store.layers):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.pos, b.pos)
        assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[n], b.state[n]) for n in a.state)
    assert plan_store.stats() == module_store.stats()


def test_plan_in_bfloat16_equals_module_path():
    model = copy.deepcopy(tiny_model(n_layers=2)).to(torch.bfloat16)  # a copy: tiny_model is cached
    model.fuse()
    (plan_logits, module_logits), (plan_store, module_store) = _stores(model, small("h2o", 10), token_ids(9), 12)
    for _ in range(12):
        token = module_logits.argmax(-1)
        plan_logits, module_logits = decode_step(model, plan_store, token), _module_step(model, module_store, token)
        assert plan_logits.dtype == torch.float32 and torch.equal(plan_logits, module_logits)


@pytest.mark.parametrize("dtypes", [(torch.float32, "bf16"), (torch.float32, "fp16"), (torch.bfloat16, "fp32"),
                                    (torch.bfloat16, "fp16")], ids=lambda d: f"{str(d[0])[6:]}-kv-{d[1]}")
@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("name", ["h2o", "weightedkv", "ahakv"])
def test_plan_with_another_kv_dtype_equals_module_path(name, positions, dtypes):
    """A cache in another dtype than the model keeps the plan (it binds store.out, still the model's dtype)
    and its steps equal the module path's bit for bit, cache included (merges and queries kept in it)."""
    model_dtype, kv_dtype = dtypes
    model = copy.deepcopy(tiny_model(n_layers=2)).to(model_dtype)  # a copy: tiny_model is cached
    model.fuse()
    (plan_logits, module_logits), (plan_store, module_store) = _stores(
        model, small(name, 10, positions=positions), token_ids(13), 14, kv_dtype)
    assert plan_store.all.k.dtype == getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[kv_dtype])
    assert Decoder(model, plan_store).path() == "plan" and plan_store.out.dtype == model_dtype
    assert torch.equal(plan_logits, module_logits)
    for _ in range(14):
        token = module_logits.argmax(-1)
        plan_logits, module_logits = decode_step(model, plan_store, token), _module_step(model, module_store, token)
        assert torch.equal(plan_logits, module_logits)
    for a, b in zip(plan_store.layers, module_store.layers):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.pos, b.pos)


def test_plan_stands_aside():
    """Where the plan must not run, the decoder takes the modules:
    the reference kernels requested, a batch past MATVEC_MAX_ROWS, fp16 weights (F.linear), any hook."""
    model = tiny_model(n_layers=2)
    _, (store, _) = _stores(model, small("full", 64), token_ids(5), 4)
    assert Decoder(model, store).path() == "plan"  # the baseline: it runs here
    with ops.use_reference():
        assert Decoder(model, store).path() == "modules"
    handle = model.norm.register_forward_pre_hook(lambda *_: None)
    try:
        assert Decoder(model, store).path() == "modules"
    finally:
        handle.remove()
    wide = ops.MATVEC_MAX_ROWS + 1
    _, (store, _) = _stores(model, small("full", 64), token_ids(5, batch=wide), 2)
    assert Decoder(model, store).path() == "modules"
    half = copy.deepcopy(tiny_model(n_layers=2)).half()
    half.fuse()
    _, (store, _) = _stores(half, small("full", 64), token_ids(5), 2)
    assert Decoder(half, store).path() == "modules"


def test_a_dropped_store_takes_its_plan_along():
    """The plans are kept per store, weakly: a plan holding the store would keep it alive forever."""
    import gc
    import weakref

    model = tiny_model(n_layers=2)
    _, (store, _) = _stores(model, small("full", 64), token_ids(5), 2)
    decoder = Decoder(model, store)
    assert decoder.path() == "plan"
    decoder.step(torch.tensor([3]))  # makes the store's plan
    gone = weakref.ref(store)
    del store, decoder
    gc.collect()
    assert gone() is None
