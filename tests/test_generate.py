"""Generation on the real default model: golden output, the HF oracle, sampling, stops, streaming, CLI errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine.generate import StopFilter
from engine.weights import expected_shapes, save_hf_folder

from .helpers import tiny_args

TEXT = (Path(__file__).parent / "fixtures" / "tokenizer" / "english.txt").read_text()
GOLDEN_PROMPT = "The history of the printing press begins"
GOLDEN = (" with the invention of the printing press in 1453 by Johannes Gutenberg. Prior to this, books were "
          "written on parchment using traditional methods.\n\nThe printing press revolutionized the way books were")


def test_golden_greedy_continuation(smollm):
    assert smollm.generate(GOLDEN_PROMPT, max_new_tokens=40, temperature=0) == GOLDEN


def test_chat_answers_paris(smollm):
    answer = smollm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=30)
    assert "Paris" in answer


def test_real_weights_match_transformers(smollm, default_model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([smollm.tokenizer.encode(TEXT)[:200]])
    assert ids.shape[1] == 200
    with torch.no_grad():
        want = hf(ids).logits
    got = smollm.logits(ids)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


def test_real_weights_cached_decode_matches_recompute(smollm):
    ids = torch.tensor([smollm.tokenizer.encode(TEXT)[:40]])
    nll_cached = smollm.nll(ids, prefill_len=8)  # 8 prefilled, 31 decode steps through the cache
    lp = smollm.logits(ids)[:, :-1].log_softmax(-1)
    nll_full = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(nll_cached, nll_full, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible(smollm):
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95)
    a = smollm.generate("Once upon a time", seed=1, **kw)
    assert a == smollm.generate("Once upon a time", seed=1, **kw)
    assert a != smollm.generate("Once upon a time", seed=2, **kw)
    assert smollm.generate("Once upon a time", max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == \
        smollm.generate("Once upon a time", max_new_tokens=12, temperature=0)


def test_stop_string_and_stream(smollm):
    out = smollm.generate(GOLDEN_PROMPT, max_new_tokens=40, stop=["Gutenberg"])
    assert out == GOLDEN[: GOLDEN.index("Gutenberg")]
    pieces = list(smollm.stream(GOLDEN_PROMPT, max_new_tokens=40))
    assert len(pieces) > 10 and "".join(pieces) == GOLDEN


def test_stop_filter_holds_back_partial_matches():
    f = StopFilter(("</answer>",))
    assert f.feed("Paris</an") == "Paris"
    assert f.feed("swer> more") == "" and f.stopped
    g = StopFilter(("XY",))
    assert g.feed("aX") == "a" and g.feed("b") == "Xb" and g.flush() == ""


def test_prompt_past_context_is_refused(smollm):
    ids = [100] * (smollm.args.max_seq_len + 1)
    with pytest.raises(engine.ContextError, match="exceeds the model context"):
        smollm.generate(ids, max_new_tokens=1)


# ---- the CLI: one clear line on stderr, non-zero exit, no traceback ----

def run_chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.chat", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_cli_answers_one_prompt(default_model_dir):
    proc = run_chat("--model", str(default_model_dir), "--prompt", "What is the capital of France?",
                    "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.fixture
def tiny_folder(tmp_path):
    args = tiny_args()
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=g) for n, s in expected_shapes(args).items()}
    return save_hf_folder(args, state, tmp_path / "tiny")


def test_cli_missing_folder(tmp_path):
    assert_user_error(run_chat("--model", str(tmp_path / "nope"), "--prompt", "hi"), "nope")


def test_cli_truncated_safetensors(tiny_folder):
    f = tiny_folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_user_error(run_chat("--model", str(tiny_folder), "--prompt", "hi"), "model.safetensors")


def test_cli_shape_mismatch(tiny_folder):
    cfg = (tiny_folder / "config.json").read_text().replace('"intermediate_size": 96', '"intermediate_size": 100')
    (tiny_folder / "config.json").write_text(cfg)
    assert_user_error(run_chat("--model", str(tiny_folder), "--prompt", "hi"), "shape")


def test_cli_pickle_pth_refused(tmp_path):
    (tmp_path / "params.json").write_text('{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 128}')
    torch.save({"x": torch.zeros(1), "evil": Path("/")}, tmp_path / "consolidated.00.pth")
    assert_user_error(run_chat("--model", str(tmp_path), "--prompt", "hi"), "weights")


@pytest.mark.parametrize("flag,value,needle", [("--dtype", "float8", "dtype"), ("--device", "tpu", "device"),
                                               ("--policy", "nosuch", "valid:")])
def test_cli_bad_flags(default_model_dir, flag, value, needle):
    assert_user_error(run_chat("--model", str(default_model_dir), "--prompt", "hi", flag, value), needle)


def test_cli_prompt_past_context(default_model_dir):
    proc = run_chat("--model", str(default_model_dir), "--prompt", "-", "--temperature", "0",
                    stdin="word " * 9000)
    assert_user_error(proc, "context")


def test_two_llms_in_one_process_are_independent(smollm):
    """No global state: interleaving two LLMs (sharing weights, different policies) changes nothing."""
    from engine.policies import H2O

    other = engine.LLM(smollm.model, smollm.tokenizer, H2O(budget=16))
    alone_a = smollm.generate(GOLDEN_PROMPT, max_new_tokens=24)
    alone_b = other.generate(GOLDEN_PROMPT, max_new_tokens=24)
    a, b = smollm.stream(GOLDEN_PROMPT, max_new_tokens=24), other.stream(GOLDEN_PROMPT, max_new_tokens=24)
    pieces_a, pieces_b = [], []
    for pa, pb in zip(a, b):
        pieces_a.append(pa)
        pieces_b.append(pb)
    pieces_a += list(a)
    pieces_b += list(b)
    assert "".join(pieces_a) == alone_a and "".join(pieces_b) == alone_b
    assert alone_a != alone_b  # the 16-token budget really evicts


def test_import_pulls_no_optional_dependency():
    code = "import sys, engine; print(sorted(m for m in ('transformers', 'matplotlib', 'pexpect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_suppressed_ids_are_never_sampled(smollm):
    """suppress=EOS ids: greedy goes on where it would have ended, for exactly max_new_tokens tokens (what
    a benchmark needs), the same tokens up to that point."""
    prompt = smollm.tokenizer.apply_chat([{"role": "user", "content": "What is the capital of France?"}])
    short = smollm.generate(prompt, max_new_tokens=64)
    fed_short = smollm.store.t - len(prompt)
    long = smollm.generate(prompt, max_new_tokens=64, suppress=smollm.tokenizer.eos_ids)
    assert fed_short < 63 and smollm.store.t - len(prompt) == 63  # the last token is sampled, never fed
    assert long.startswith(short) and len(long) > len(short)


def test_suppress_is_checked():
    from engine.generate import SamplingParams, sample

    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    assert sample(logits, SamplingParams(suppress=(1,)), None).tolist() == [2]
    assert sample(logits, SamplingParams(suppress=(1, 2), temperature=1.0, top_k=1), None).tolist() == [3]
    assert logits[0, 1] == 3.0  # the caller's logits are left as they were
    for bad in [(-1,), (1.5,), (True,), 3]:
        with pytest.raises(ValueError, match="suppress"):
            SamplingParams(suppress=bad)


def test_suppress_past_the_vocabulary_is_refused(smollm):
    with pytest.raises(ValueError, match="suppress"):
        smollm.generate("Hi", max_new_tokens=2, suppress=[smollm.args.vocab_size])
    with pytest.raises(ValueError, match="suppress"):
        smollm.generate("Hi", max_new_tokens=2, suppress=range(smollm.args.vocab_size))


def mass_before(logits: torch.Tensor) -> torch.Tensor:
    """Each token's top-p test statistic, by the definition, in float64: a sort of the whole vocabulary and
    the mass of the tokens before it."""
    sorted_logits, order = logits.double().sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs
    return before.scatter(-1, order, before)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 0, 0.5), (3.0, 0, 0.99), (0.7, 50, 0.9),
                                                     (1.0, 0, 1e-6), (1.5, 5000, 0.95)])
def test_top_p_keeps_what_a_sort_of_the_vocabulary_keeps(temperature, top_k, top_p):
    """nucleus looks among the likeliest tokens first and widens where they hold too little (the flat rows at
    temperature 3 need the whole vocabulary): the tokens the definition keeps, row by row, bar a token whose
    mass before it is top_p within float32 rounding (float32 sums in another order land either side)."""
    from engine.generate import SamplingParams, candidates

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 49152, generator=g) * torch.tensor([[1.0], [2.0], [4.0], [8.0], [0.5], [16.0]])
    probs, ids = candidates(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k, dim=-1).values[:, -1:], -float("inf"))
    before = mass_before(scaled)
    want = (before < top_p) & (scaled > -float("inf"))
    got = torch.zeros_like(want).scatter(-1, ids, probs > 0)
    assert bool(((got == want) | ((before - top_p).abs() < 1e-5)).all())
    assert int((got != want).sum()) <= 6 and int(want.sum(-1).min()) >= 1


@pytest.mark.parametrize("top_k,top_p,kept", [(0, 1.0, [0, 1, 2, 3, 5]), (3, 1.0, [0, 1, 2]), (0, 0.9, [0, 1, 2, 3])])
def test_sampling_draws_each_kept_token_at_its_probability(top_k, top_p, kept):
    """20000 draws from 6 tokens, token 4 suppressed: each kept token's share within 4 standard deviations of
    its probability among the kept, the others never drawn (top-p 0.9: 0.94 of the mass is left, and the mass
    before token 5 is 0.90/0.94 >= 0.9)."""
    from engine.generate import SamplingParams, sample

    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.double)
    logits = p.log().float()[None].expand(20000, 6).contiguous()
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, suppress=(4,))
    got = torch.bincount(sample(logits, params, torch.Generator().manual_seed(0)), minlength=6).double() / 20000
    want = torch.zeros(6, dtype=torch.double)
    want[kept] = p[kept] / p[kept].sum()
    sd = (want * (1 - want) / 20000).sqrt()
    assert bool((got[want == 0] == 0).all()) and bool(((got - want).abs() <= 4 * sd).all()), (got, want)
