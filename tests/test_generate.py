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
