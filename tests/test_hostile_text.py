"""Hostile input (issue 17): text that is not valid Unicode, token ids that are not ids, transcript lines
that are not records, and an interrupted model conversion. The documented outcomes: TextError (a
ValueError) naming where the text came from, a ValueError naming the first bad id and its position, a
ValueError naming the transcript's file and line, exit code 130 with one line; never another exception,
a traceback or a hang (every test runs under an alarm, every subprocess under a timeout)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine.chat import Conversation, Transcript, read_transcript
from engine.fetch import DEFAULT_MODEL, PACKAGE_MODULE
from engine.generate import SamplingParams
from engine.llm import LLM
from engine.tokenizer import TextError

FUZZ = settings(max_examples=60, deadline=timedelta(seconds=20), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NASTY = ["\udcff", "\udce9", "\udc80", "\ud800", "\udfff", "\x00", "\x1b[2J", "\r", "\n", "\u2028", "\x85", "\ufeff",
         "\U0010ffff", "</s>", "<|im_end|>", "<|im_start|>", "é", "🙂", " ", "{", '"']
CHAR = st.characters(exclude_categories=()) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(CHAR, max_size=24) | st.lists(st.sampled_from(NASTY), max_size=6).map("".join)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    return engine.load(tiny_model_dir)


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A hang fails its test instead of stalling the suite."""
    def fail(signum: int, frame: object) -> None:
        raise TimeoutError("the test ran past 240 s: a hang?")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def valid(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


# ---- class 3: text that is not valid Unicode -----------------------------------------------------

@FUZZ
@given(text=TEXT)
def test_any_text_through_the_library(llm: LLM, text: str) -> None:
    """A prompt or a chat message is answered, or refused with TextError when it holds a lone surrogate."""
    messages = [{"role": "user", "content": text}]
    if valid(text):
        assert isinstance(llm.chat(messages, max_new_tokens=2), str)
        if llm.tokenizer.encode(text):
            assert isinstance(llm.generate(text, max_new_tokens=2), str)
        return
    with pytest.raises(TextError) as e:
        llm.generate(text, max_new_tokens=2)
    assert one_line(e).startswith("the text is not valid Unicode: ")
    with pytest.raises(TextError) as e:
        llm.chat(messages, max_new_tokens=2)
    assert one_line(e).startswith("message 0 is not valid Unicode: ")


def test_text_errors_name_the_byte_and_where_it_came_from(llm: LLM) -> None:
    with pytest.raises(TextError, match=r"^the text is not valid Unicode: byte 0xe9 that is not UTF-8 at character 3$"):
        llm.generate("caf\udce9", max_new_tokens=2)
    with pytest.raises(TextError, match=r"^message 1 is not valid Unicode: lone surrogate U\+D800 at character 2$"):
        llm.chat([{"role": "system", "content": "hi"}, {"role": "user", "content": "ab\ud800"}], max_new_tokens=2)
    with pytest.raises(TextError, match=r"^the text is not valid Unicode"):
        list(llm.stream("\udcff", max_new_tokens=2))


def test_conversation_refuses_bad_text_and_keeps_its_state(llm: LLM) -> None:
    conv = Conversation(llm, SamplingParams(max_new_tokens=3))
    conv.ask("hello")
    s = conv.session
    before = (list(conv.turns), s.tokens + s.pending, s.store.t)
    with pytest.raises(TextError, match=r"message 2 is not valid Unicode: byte 0xff"):
        conv.ask("say \udcff")
    assert (conv.turns, s.tokens + s.pending, s.store.t) == before
    assert conv.ask("again").tokens >= 1 and len(conv.turns) == 4


# ---- class 4: token ids --------------------------------------------------------------------------

DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.complex64]


@st.composite
def id_inputs(draw: st.DrawFn, vocab: int = 49152) -> torch.Tensor | list:
    """Ids of a random dtype and shape, as a tensor or nested lists. Half the time each: the shape is [T] or
    [B, T] (else 0-3 dimensions, empty ones included), the dtype an integer one, every value in the vocabulary."""
    good_shape = st.lists(st.integers(1, 3), min_size=1, max_size=2)
    shape = draw(good_shape if draw(st.booleans()) else st.lists(st.integers(0, 3), max_size=3))
    n = int(torch.Size(shape).numel())
    value = st.integers(0, vocab - 1)
    if draw(st.booleans()):
        value |= st.sampled_from([-1, -(2**40), vocab, vocab + 1, 2**40])
    t = torch.tensor(draw(st.lists(value, min_size=n, max_size=n)), dtype=torch.int64).reshape(shape)
    t = t.to(draw(st.sampled_from(DTYPES[:5] if draw(st.booleans()) else DTYPES)))
    return t.tolist() if draw(st.booleans()) and not t.is_complex() else t


def expected_error(ids: torch.Tensor | list, vocab: int) -> str | None:
    """The documented ValueError's words for these ids, or None when they are valid."""
    t = torch.as_tensor(ids)
    if t.dim() not in (1, 2):
        return "must have shape [T] or [B, T]"
    if t.numel() == 0:
        return "empty prompt"
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        return f"token ids must be integers, got {t.dtype}"
    rows = t.tolist() if t.dim() == 2 else [t.tolist()]
    bad = [(b, i, v) for b, row in enumerate(rows) for i, v in enumerate(row) if not 0 <= v < vocab]
    if not bad:
        return None
    b, i, v = bad[0]
    return f"token id {v} at position {[b, i] if t.dim() == 2 else i} is outside the vocabulary"


@FUZZ
@given(ids=id_inputs())
def test_any_ids_through_nll_logits_and_generate(llm: LLM, ids: torch.Tensor | list) -> None:
    """Valid ids give numbers of the right shape; anything else a one-line ValueError with the reason."""
    vocab = llm.args.vocab_size
    want = expected_error(ids, vocab)
    t = torch.as_tensor(ids)
    B, T = t.reshape(-1, t.shape[-1]).shape if want is None else (0, 0)
    shapes = {"logits": (B, T, vocab), "nll": (B, T - 1)}
    runs = {"logits": llm.logits, "nll": llm.nll, "generate": lambda x: llm.generate(x, max_new_tokens=1)}
    for name, run in runs.items():
        error = "take one prompt" if want is None and name == "generate" and B > 1 else want
        if error is not None:
            with pytest.raises(ValueError) as e:
                run(ids)
            assert error in one_line(e)
        elif name == "generate":
            assert isinstance(run(ids), str)
        else:
            out = run(ids)
            assert out.shape == shapes[name] and torch.isfinite(out).all()


@pytest.mark.parametrize("ids, words", [
    (torch.tensor([[1.0, 2.0]]), "token ids must be integers, got torch.float32"),
    (torch.tensor([[True, False]]), "token ids must be integers, got torch.bool"),
    ([1, 2.5], "token ids must be integers, got torch.float32"),
    (torch.tensor([[5, 49152, -1]]), "token id 49152 at position [0, 1] is outside the vocabulary (0 <= id < 49152)"),
    ([7, 8, -3], "token id -3 at position 2 is outside the vocabulary"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "must have shape [T] or [B, T], got [1, 2, 3]"),
    (torch.tensor(5), "must have shape [T] or [B, T], got []"),
    ([], "empty prompt"),
    ([[1, 2], [3]], "token ids must be integers in a list or tensor"),
    ([2**70], "token ids must be integers in a list or tensor"),
])
def test_bad_ids_are_named(llm: LLM, ids: torch.Tensor | list, words: str) -> None:
    for run in (llm.logits, llm.nll, lambda x: llm.generate(x, max_new_tokens=1)):
        with pytest.raises(ValueError) as e:
            run(ids)
        assert words in one_line(e)


# ---- transcripts ---------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
FIELD = st.sampled_from(["start", "reset", "user", "assistant", "system", ""]) | JSON
RECORD = st.fixed_dictionaries({}, optional={"event": FIELD, "role": FIELD, "content": FIELD, "system": FIELD,
                                             "resumed": FIELD})


@pytest.mark.parametrize("prefill_len", [0, 6, True, 2.5, -1])
def test_nll_refuses_a_prefill_length_outside_the_sequence(llm: LLM, prefill_len: object) -> None:
    with pytest.raises(ValueError, match=r"prefill_len must be an int in \[1, 5\]") as e:
        llm.nll(torch.tensor([[1, 2, 3, 4, 5]]), prefill_len=prefill_len)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ids, words", [([1.5], "must be integers"), ([49152], "token id 49152 at position 0"),
                                        ([-3], "token id -3 at position 0"),
                                        ([[1, 2], [3, 4]], r"one sequence of ids \[T\], got shape \[2, 2\]")])
def test_session_feed_checks_ids_like_every_other_entry(llm: LLM, ids: list, words: str) -> None:
    session = llm.session(max_new_tokens=4)
    with pytest.raises(ValueError, match=words):
        session.feed(ids)
    assert session.tokens == [] and session.feed([1, 2]).shape == (1, 49152)


def encoded(value: object, ascii: bool) -> bytes:
    """A JSON line with \\u escapes, or written raw (surrogates as the invalid UTF-8 they encode to)."""
    return json.dumps(value, ensure_ascii=ascii).encode("utf-8", "surrogatepass")


LINE = st.one_of(
    st.builds(encoded, JSON | RECORD, st.booleans()),
    st.integers(500, 6000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(500, 6000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.binary(max_size=30),
    st.just(b'{"x": ' + b"7" * 5000 + b"}"),
)


@FUZZ
@given(lines=st.lists(LINE, max_size=5), newline=st.booleans())
def test_any_transcript_lines(lines: list[bytes], newline: bool) -> None:
    """A transcript reads as (system, turns), or a one-line ValueError naming the file and the line."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n" * newline)
        try:
            system, turns = read_transcript(path)
        except ValueError as e:
            message = str(e)
            assert message.startswith(f"{path} line ") and "\n" not in message, message
            return
    assert system is None or isinstance(system, str)
    assert all(isinstance(m["content"], str) and valid(m["content"]) for m in turns)
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)


@FUZZ
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_transcripts_write_any_text_and_read_it_back_or_name_its_line(texts: list[str]) -> None:
    """Writing never fails; reading gives the texts back, or TextError at the first line that is not valid."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        t = Transcript(path)
        t.write({"event": "start", "resumed": False, "system": None, "model": "m\udcff"})
        for text in texts:
            t.write({"role": "user", "content": text})
            t.write({"role": "assistant", "content": text})
        t.close()
        path.read_bytes().decode("utf-8")  # the file stays UTF-8
        stored = [json.loads(json.dumps(text)) for text in texts]  # a surrogate as its escape (a pair rejoins)
        bad = [i for i, text in enumerate(stored) if not valid(text)]
        if not bad:
            want = [{"role": role, "content": text} for text in stored for role in ("user", "assistant")]
            assert read_transcript(path)[1] == want
            return
        with pytest.raises(TextError) as e:
            read_transcript(path)
        assert one_line(e).startswith(f"{path} line {2 + 2 * bad[0]} is not valid Unicode: ")


def test_transcript_errors_name_the_line(tmp_path: Path) -> None:
    start = b'{"event": "start", "resumed": false, "system": null}\n'
    cases = [
        (start + b"[" * 5000 + b"]" * 5000 + b"\n", "line 2: not a transcript record (nested too deeply)"),
        (start + b'{"role": "user", "content": "caf\xe9"}\n', "line 2: not UTF-8 (byte 0xe9 at offset 32)"),
        (start + b'{"role": "user", "content": "\\udcff"}\n',
         "line 2 is not valid Unicode: byte 0xff that is not UTF-8 at character 0"),
        (start + b"[1, 2]\n", "line 2: not a transcript record"),
        (start + b'{"role": "user", "content": ["hi"]}\n', "line 2: not a transcript record"),
    ]
    for i, (data, words) in enumerate(cases):
        path = tmp_path / f"{i}.jsonl"
        path.write_bytes(data)
        with pytest.raises(ValueError) as e:
            read_transcript(path)
        assert one_line(e) == f"{path} {words}"


def test_transcript_keeps_line_separators_inside_text(tmp_path: Path) -> None:
    """JSON leaves U+2028 and U+0085 unescaped: they are text, not line breaks. A last line cut off inside a
    UTF-8 character is a line cut off mid-write."""
    path = tmp_path / "t.jsonl"
    t = Transcript(path)
    turns = [{"role": "user", "content": "a\u2028b\x85c\x1cd"}, {"role": "assistant", "content": "e\u2029f"}]
    for m in turns:
        t.write(m)
    t.close()
    with open(path, "ab") as f:
        f.write('{"role": "user", "content": "é'.encode()[:-1])
    assert read_transcript(path) == (None, turns)


# ---- the command line ------------------------------------------------------------------------------

def chat(*args: str, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.chat", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_cli_refuses_undecodable_flags_and_transcripts_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(b'{"event": "start", "system": null}\n' + b"[" * 5000 + b"]" * 5000 + b"\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"role": "user", "content": "caf\xe9"}\n{"role": "assistant", "content": "oui"}\n')
    model = ("--model", str(tiny_model_dir))
    cases = [  # arguments (a surrogate reaches the process as the undecodable byte), the one error line
        ([*model, "--prompt", "caf\udce9"],
         "error: --prompt is not valid Unicode: byte 0xe9 that is not UTF-8 at character 3"),
        ([*model, "--system", "\udcff", "--prompt", "hi"],
         "error: --system is not valid Unicode: byte 0xff that is not UTF-8 at character 0"),
        ([*model, "--resume", str(deep), "--prompt", "hi"],
         f"error: {deep} line 2: not a transcript record (nested too deeply)"),
        ([*model, "--resume", str(latin)], f"error: {latin} line 1: not UTF-8 (byte 0xe9 at offset 32)"),
    ]
    procs = [chat(*args) for args, _ in cases]  # together: Python's startup dominates
    for proc, (_, line) in zip(procs, cases, strict=True):
        out, err = proc.communicate(b"", timeout=300)
        assert proc.returncode == 2 and err.decode().strip() == line, err.decode()


def test_piped_session_survives_undecodable_lines(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Both ways Python decodes stdin: surrogateescape (a C.UTF-8 locale) and strict (most UTF-8 locales)."""
    envs = [{"LC_ALL": "C.UTF-8"}, {"PYTHONIOENCODING": "utf-8:strict"}]
    procs = [chat("--model", str(tiny_model_dir), "--max-new-tokens", "3", "--transcript", str(tmp_path / f"{i}.jsonl"),
                  env={**os.environ, **env}) for i, env in enumerate(envs)]
    for i, proc in enumerate(procs):
        out, err = proc.communicate(b"hello\ncaf\xe9?\n/stats\n/system \xff\nbye\n", timeout=300)
        assert proc.returncode == 0 and err.decode().splitlines() == [
            "error: the line is not valid Unicode: byte 0xe9 that is not UTF-8 at character 3; it was not sent "
            "(is the terminal set to UTF-8?)",
            "error: the line is not valid Unicode: byte 0xff that is not UTF-8 at character 8; it was not sent "
            "(is the terminal set to UTF-8?)"], err.decode()
        assert "conversation: 1 turns" in out.decode()
        records = [json.loads(line) for line in (tmp_path / f"{i}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [r.get("content") for r in records if r.get("role") == "user"] == ["hello", "bye"]


def test_terminal_session_survives_an_undecodable_line(tiny_model_dir: Path) -> None:
    """A pseudo-terminal with readline (strict decoding, as most UTF-8 locales have it): 0xff is never UTF-8,
    so readline passes it on; the line is refused and the conversation goes on."""
    pexpect = pytest.importorskip("pexpect")
    args = ["-m", "engine.chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3"]
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", codec_errors="surrogateescape", timeout=120,
                          env={**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8:strict"}, dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        child.sendline("hello")
        child.expect_exact(">>> ")
        child.sendline("say \udcff please")
        child.expect_exact("error: the line is not valid Unicode: byte 0xff that is not UTF-8 at character 4; "
                           "it was not sent")
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect_exact("conversation: 1 turns")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before, child.before


# ---- class 5: an interrupted conversion ------------------------------------------------------------

def convert(weights: Path, sig: signal.Signals) -> tuple[int, list[str]]:
    """`python -m engine.fetch` into `weights`, sent `sig` once it is dequantizing: (exit code, stderr lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.fetch"], env={**os.environ, "ENGINE_WEIGHTS": str(weights)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's Ctrl-C
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith("reading and dequantizing"):
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, lines + rest.splitlines()


def test_interrupted_conversion_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C: exit 130 and one line, nothing on disk. kill -9 leaves the temporary folder; the next run
    removes it (and is interrupted in turn)."""
    if importlib.util.find_spec(PACKAGE_MODULE) is None:
        pytest.skip(f"converting needs the {PACKAGE_MODULE} package, which is not installed")
    code, err = convert(tmp_path, signal.SIGINT)
    dest = tmp_path / DEFAULT_MODEL
    assert code == 130 and err[-1] == f"interrupted: {dest} was not written; the next run starts over", err
    assert not any("Traceback" in line for line in err) and list(tmp_path.iterdir()) == []
    code, err = convert(tmp_path, signal.SIGKILL)
    leftover = list(tmp_path.iterdir())
    assert code == -9 and len(leftover) == 1 and leftover[0].name.startswith(f".{dest.name}.partial-")
    code, err = convert(tmp_path, signal.SIGINT)
    assert code == 130 and err[0] == f"removing {leftover[0]}, left by a conversion that was killed", err
    assert list(tmp_path.iterdir()) == []
