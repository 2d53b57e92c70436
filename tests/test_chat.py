"""The chat: appending turns to the cache (chatml, llama-2, vicuna), every policy, interrupts, transcripts,
memory over a long conversation, the CLI's errors, and a real terminal session (pexpect)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

import engine
from engine.chat import Conversation, Transcript, continuation, read_transcript
from engine.generate import SamplingParams
from engine.tokenizer import Tokenizer, export_gguf_tokenizer, load_tokenizer

from .helpers import llama_spm_vocab, tiny_chat_model

U1, R1, U2 = "What is 2+2?", "It is 4.", "And 3+3?"


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("llama-tok")
    export_gguf_tokenizer(gguf.GGUFReader(llama_spm_vocab()), d)
    return d


@pytest.fixture(scope="module")
def tiny_smol(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_model(default_model_dir, tmp_path_factory.mktemp("tiny") / "smol")


def ids_after(tok: Tokenizer, history: list[dict[str, str]], reply_ids: list[int]) -> list[int]:
    """What a cache holds after the model answered `history` with `reply_ids`."""
    return tok.apply_chat(history) + reply_ids


def canonical_reply(tok: Tokenizer, history: list[dict[str, str]], reply: str) -> list[int]:
    """The reply's ids exactly as the template renders them (up to the next turn)."""
    return tok.apply_chat([*history, {"role": "assistant", "content": reply}], add_generation_prompt=False)[
        len(tok.apply_chat(history)):]


# ---- continuation: which path each template takes, and that the result is the template's ----------

def test_chatml_continuation(default_model_dir: Path) -> None:
    tok = load_tokenizer(default_model_dir)
    h = [{"role": "user", "content": U1}]
    done = [*h, {"role": "assistant", "content": R1}]
    want = tok.apply_chat([*done, {"role": "user", "content": U2}])
    im_end = tok.eos_ids[-1]
    # the model's ids re-encode to themselves and it closed its turn: append the rest as rendered
    cached = ids_after(tok, h, tok.encode(R1) + [im_end])
    ids, path = continuation(tok, cached, done, U2)
    assert path == "prefix" and cached + ids == want
    # the model sampled "It is 4." in other pieces: close the turn, then the new turn as rendered on its own
    odd = [i for ch in R1 for i in tok.encode(ch)]
    assert odd != tok.encode(R1)
    for closed_by_model in (True, False):
        cached = ids_after(tok, h, odd + [im_end] * closed_by_model)
        ids, path = continuation(tok, cached, done, U2)
        tail = want[len(tok.apply_chat(done, add_generation_prompt=False)):]
        assert path == "turn" and ids == [im_end] * (not closed_by_model) + tok.encode("\n") + tail
        assert tok.decode(tail).startswith("user\n" + U2)


@pytest.mark.parametrize("template", ["llama-2", "vicuna"])
def test_sentencepiece_template_continuation(llama_tok_dir: Path, template: str) -> None:
    tok = load_tokenizer(llama_tok_dir, template=template)
    eos, bos = tok.eos_ids[0], tok.bos_id
    h = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": U1}]
    done = [*h, {"role": "assistant", "content": R1}]
    want = tok.apply_chat([*done, {"role": "user", "content": U2}])
    closed = tok.apply_chat(done, add_generation_prompt=False)
    # ids as the template renders the reply: the rendering continues the cache
    ids, path = continuation(tok, ids_after(tok, h, canonical_reply(tok, h, R1)), done, U2)
    assert path == "prefix" and closed + ids == want
    # as a model samples it: "It is 4." then </s>, without the space llama-2 puts before </s>
    sampled = canonical_reply(tok, h, R1)[: -2 if template == "llama-2" else -1]
    assert tok.decode(sampled) == R1
    cached = ids_after(tok, h, sampled + [eos])
    ids, path = continuation(tok, cached, done, U2)
    if template == "llama-2":
        assert path == "turn" and ids == [bos] + tok.encode(f"[INST] {U2} [/INST]")
    else:
        assert path == "prefix" and cached + ids == want
    # cut short (Ctrl-C): the history holds what was shown, which the rendering continues
    short = [*h, {"role": "assistant", "content": tok.decode(sampled[:2])}]
    cached = ids_after(tok, h, sampled[:2])
    ids, path = continuation(tok, cached, short, U2)
    assert path == "prefix" and cached + ids == tok.apply_chat([*short, {"role": "user", "content": U2}])
    # sampled in other pieces and cut short: close the turn with </s>, then the new turn as rendered alone
    odd = [i for ch in R1 for i in tok.encode(ch)]
    ids, path = continuation(tok, ids_after(tok, h, odd), done, U2)
    assert path == "turn" and ids == [eos] + want[len(closed):]
    assert want[len(closed):][:1] == ([bos] if template == "llama-2" else tok.encode("USER:")[:1])


def test_fresh_and_resumed_caches_take_the_prefix_path(llama_tok_dir: Path, default_model_dir: Path) -> None:
    for tok in (load_tokenizer(default_model_dir), load_tokenizer(llama_tok_dir, template="llama-2"),
                load_tokenizer(llama_tok_dir, template="vicuna")):
        done = [{"role": "user", "content": U1}, {"role": "assistant", "content": R1}]
        want = tok.apply_chat([*done, {"role": "user", "content": U2}])
        assert continuation(tok, [], [], U1) == (tok.apply_chat(done[:1]), "prefix")
        resumed = tok.apply_chat(done, add_generation_prompt=False)
        ids, path = continuation(tok, resumed, done, U2)
        assert path == "prefix" and resumed + ids == want


# ---- conversations on a model ---------------------------------------------------------------------

def cache_matches_recompute(conv: Conversation) -> None:
    """(full cache) The next-token logits of the cache built turn by turn equal one fresh forward over
    its tokens. Feeds the pending token, so call it last."""
    s = conv.session
    ids = s.tokens + s.pending
    assert s.pending and s.store.t == len(s.tokens)
    want = conv.llm.logits(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(s.feed([])[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", engine.list_policies())
def test_every_policy_keeps_a_conversation_in_one_cache(tiny_smol: Path, policy: str) -> None:
    llm = engine.load(tiny_smol, policy=policy, **({} if policy == "full" else {"budget": 48}))
    conv = Conversation(llm, SamplingParams(max_new_tokens=6))
    store = conv.session.store
    buffers = [layer.k.data_ptr() for layer in store.layers]
    total = 0
    for i in range(4):
        reply = conv.ask(f"Question number {i}?")
        total += reply.prompt_tokens + reply.tokens
        assert reply.tokens >= 1 and store.occupancy <= store.capacity
    s = conv.session
    # every token went into the cache once: no turn prefilled the conversation again
    assert store.t == len(s.tokens) and total == len(s.tokens) + len(s.pending)
    assert store.stats().tokens_seen > store.budget or policy == "full"
    assert [layer.k.data_ptr() for layer in store.layers] == buffers
    assert [t["role"] for t in conv.turns] == ["user", "assistant"] * 4
    if policy == "full":
        cache_matches_recompute(conv)


def test_interrupted_reply_stays_consistent(tiny_smol: Path) -> None:
    llm = engine.load(tiny_smol)
    conv = Conversation(llm, SamplingParams(max_new_tokens=50))
    shown: list[str] = []
    reply = conv.ask("Tell me a story.", shown.append, stop=lambda: True)
    assert reply.stopped == "interrupted" and reply.tokens >= 1 and len(shown) == 1
    assert conv.turns[-1] == {"role": "assistant", "content": reply.text} and reply.text == shown[0]
    s = conv.session
    assert s.store.t == len(s.tokens) and len(s.pending) == 1  # the last sampled token waits for the next turn
    nxt = conv.ask("Go on.")
    assert nxt.prompt_tokens >= 1 and s.store.t == len(s.tokens)
    cache_matches_recompute(conv)


def test_llama2_conversation_on_a_model(llama_tok_dir: Path, tmp_path: Path) -> None:
    llm = engine.load(tiny_chat_model(llama_tok_dir, tmp_path / "m"), policy="streaming", budget=40, sinks=4,
                      template="llama-2")
    conv = Conversation(llm, SamplingParams(max_new_tokens=5), system="Be brief.")
    tok = llm.tokenizer
    conv.ask(U1)
    before = conv.session.tokens + conv.session.pending
    history = conv.messages
    reply = conv.ask(U2)
    added = (conv.session.tokens + conv.session.pending)[len(before):][: reply.prompt_tokens]
    if reply.path == "turn":
        closed_by_model = before[-1] in tok.eos_ids
        assert added == [tok.eos_ids[0]] * (not closed_by_model) + [tok.bos_id] + tok.encode(f"[INST] {U2} [/INST]")
    else:
        assert before + added == tok.apply_chat([*history, {"role": "user", "content": U2}])


def test_full_cache_bounds_the_reply_and_refuses_politely(default_model_dir: Path, tmp_path: Path) -> None:
    llm = engine.load(tiny_chat_model(default_model_dir, tmp_path / "m", max_seq_len=96))  # full: 96 slots
    conv = Conversation(llm, SamplingParams(max_new_tokens=100))
    store = conv.session.store
    reply = conv.ask("x " * 20)
    assert reply.stopped == "context" and store.occupancy == store.capacity == 96
    with pytest.raises(engine.ContextError, match="exceed the 96 slots of policy full"):
        conv.ask("more")
    assert store.t == len(conv.session.tokens) and len(conv.turns) == 2


def rss_bytes() -> int:
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc/self/status")
    kb = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    return kb * 1024


@pytest.mark.slow
def test_hundred_turns_stay_within_the_budget(default_model_dir: Path) -> None:
    """The REPL's own code path (Conversation.ask) over 100 turns with a 512-token budget: the cache's
    buffers never move or grow, occupancy stays at the budget, and the process does not grow."""
    llm = engine.load(default_model_dir, policy="h2o", budget=512)
    conv = Conversation(llm, SamplingParams(max_new_tokens=8, temperature=0))
    store = conv.session.store
    buffers = [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in store.layers]
    occupancy, rss = [], {}
    for i in range(100):
        conv.ask(f"Give me a fact about the number {i}.")
        occupancy.append(store.occupancy)
        if i in (30, 99):
            rss[i] = rss_bytes()
    st = store.stats()
    assert st.tokens_seen > 3 * 512 and st.evictions > 0
    assert st.capacity == 513 and max(occupancy) == 512 and occupancy[-40:] == [512] * 40
    assert [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in store.layers] == buffers
    assert rss[99] - rss[30] < 32 * 2**20, f"RSS grew by {(rss[99] - rss[30]) / 2**20:.1f} MiB over 70 turns"


# ---- transcripts -------------------------------------------------------------------------------

def test_transcript_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    t = Transcript(path)
    t.write({"event": "start", "resumed": False, "system": "old"})
    t.write({"role": "user", "content": "first"})
    t.write({"event": "reset", "system": "Be brief."})
    t.write({"role": "user", "content": U1})
    t.write({"role": "assistant", "content": R1, "stopped": "eos"})
    t.write({"event": "start", "resumed": True, "system": "Be brief."})
    t.write({"role": "user", "content": "never answered"})
    t.write({"role": "user", "content": U2})
    t.write({"role": "assistant", "content": "6 ✓"})
    t.close()
    assert all("time" in json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    system, turns = read_transcript(path)
    assert system == "Be brief."
    assert turns == [{"role": "user", "content": U1}, {"role": "assistant", "content": R1},
                     {"role": "user", "content": U2}, {"role": "assistant", "content": "6 ✓"}]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"role": "user", "cont')  # killed mid-write
    assert read_transcript(path) == (system, turns)
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n{"role": "user", "content": 1}\n')
    with pytest.raises(ValueError, match="line"):
        read_transcript(path)
    Transcript(path).write({"event": "start", "resumed": False, "system": None})
    with pytest.raises(ValueError, match="line"):
        read_transcript(path)


# ---- the command line --------------------------------------------------------------------------

def run_chat(*args: str, stdin: bytes | str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.chat", *args], capture_output=True, input=stdin,
                          text=isinstance(stdin, str) or stdin is None, timeout=timeout)


def user_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    stderr = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], stderr
    return lines[0]


def test_cli_user_errors(tiny_smol: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_smol, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    (tmp_path / "file").write_text("")
    cases = [  # (arguments, stdin, the error line's words)
        (["--model", "no-such-model", "--prompt", "hi"], None, "unknown model 'no-such-model'"),
        (["--model", str(bare), "--prompt", "hi"], None, "no tokenizer.model or tokenizer.json"),
        (["--model", str(tiny_smol), "--prompt", "-"], b"caf\xe9?", "stdin is not UTF-8 text (byte 0xe9 at offset 3)"),
        (["--model", str(tiny_smol), "--transcript", str(tmp_path / "file" / "t.jsonl")], None,
         "cannot write the transcript"),
        (["--model", str(tiny_smol), "--transcript", str(tmp_path)], None, "cannot write the transcript"),
        (["--model", str(tiny_smol), "--resume", str(tmp_path / "none.jsonl")], None, "cannot read the transcript"),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "engine.chat", *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args, _, _ in cases]
    for proc, (_, stdin, needle) in zip(procs, cases, strict=True):  # run together: Python's startup dominates
        out, err = proc.communicate(stdin, timeout=300)
        user_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), needle)


@pytest.mark.parametrize("value", ["1", "3"])
def test_threads_flag_sets_the_thread_count_before_anything_runs(value: str) -> None:
    """--threads (every entry point's model flags) takes effect as it is parsed."""
    from engine.chat import parse_args

    before = torch.get_num_threads()
    try:
        assert parse_args(["--threads", value]).threads == int(value)
        assert torch.get_num_threads() == int(value)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_flag_refuses_what_is_not_a_thread_count(value: str, capsys) -> None:
    from engine.chat import parse_args

    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as info:
        parse_args(["--threads", value])
    assert info.value.code == 2 and "--threads" in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_cli_prompt_past_the_context_names_what_fits(tiny_smol: Path) -> None:
    line = user_error(run_chat("--model", str(tiny_smol), "--prompt", "-", stdin="word " * 600), "context")
    assert "--policy" in line and "--budget" in line
    fits = run_chat("--model", str(tiny_smol), "--prompt", "-", "--policy", "streaming", "--budget", "64",
                    "--max-new-tokens", "3", stdin="word " * 600)
    assert fits.returncode == 0, fits.stderr


def test_cli_piped_session_transcript_and_resume(tiny_smol: Path, tmp_path: Path) -> None:
    t = tmp_path / "chat.jsonl"
    common = ("--model", str(tiny_smol), "--policy", "h2o", "--budget", "32", "--max-new-tokens", "4",
              "--temperature", "0")
    proc = run_chat(*common, "--transcript", str(t), stdin="hello\n/stats\nsecond question\n/nope\n/help\n")
    assert proc.returncode == 0, proc.stderr  # Ctrl-D (end of input) leaves cleanly
    assert "occupancy per layer" in proc.stdout and "unknown command /nope" in proc.stdout
    assert "/reset" in proc.stdout and "Traceback" not in proc.stderr
    records = [json.loads(line) for line in t.read_text(encoding="utf-8").splitlines()]
    assert [r.get("role") or r["event"] for r in records] == ["start", "user", "assistant", "user", "assistant"]
    proc = run_chat(*common, "--resume", str(t), stdin="/stats\nthird\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert "resumed 2 turns" in proc.stdout and "conversation: 2 turns" in proc.stdout
    assert read_transcript(t)[1][-2] == {"role": "user", "content": "third"}


def test_cli_one_shot_prints_only_the_answer(default_model_dir: Path) -> None:
    proc = run_chat("--model", str(default_model_dir), "--prompt", "-", "--temperature", "0",
                    "--max-new-tokens", "20", stdin="What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "The capital of France is Paris."


@pytest.mark.slow
def test_terminal_session(default_model_dir: Path, tmp_path: Path) -> None:
    """A real pseudo-terminal: two questions, /stats, Ctrl-C during a long reply, Ctrl-C again to leave."""
    pexpect = pytest.importorskip("pexpect")
    t = tmp_path / "t.jsonl"
    child = pexpect.spawn(sys.executable, ["-m", "engine.chat", "--model", str(default_model_dir), "--policy", "h2o",
                                           "--budget", "256", "--temperature", "0", "--max-new-tokens", "300",
                                           "--transcript", str(t)],
                          encoding="utf-8", timeout=240, env={**os.environ, "TERM": "dumb"}, dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("Paris")
        child.expect_exact(">>> ")
        child.sendline("What is the capital of Spain?")
        child.expect_exact("Madrid")
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect(r"occupancy per layer .*: (\d+) of 257 slots")
        child.expect_exact("evictions:")
        child.expect_exact(">>> ")
        child.sendline("Write a very long story about a dragon who learns to bake bread.")
        child.expect_exact("bread.\r\n")  # the terminal's echo of the line
        child.expect(r"\w+\W+\w+\W+\w+")  # the reply is streaming
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    records = [json.loads(line) for line in t.read_text(encoding="utf-8").splitlines()]
    replies = [r for r in records if r.get("role") == "assistant"]
    assert [r.get("role") or r["event"] for r in records] == ["start"] + ["user", "assistant"] * 3
    assert "Paris" in replies[0]["content"] and "Madrid" in replies[1]["content"]
    assert replies[2]["stopped"] == "interrupted" and 0 < replies[2]["tokens"] < 300
