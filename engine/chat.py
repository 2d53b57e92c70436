"""`python -m engine.chat`: chat with a model in the terminal, or answer one prompt (--prompt).

The conversation lives in one KV cache (engine.llm.Session): each turn appends the new user message
and the reply to it; nothing said before is prefilled again. Commands: /stats /reset /system /help
/quit. Ctrl-C stops a reply (it stays in the conversation as far as it got); Ctrl-C again at the
prompt, or Ctrl-D, leaves. --transcript appends every turn to a JSONL file (flushed and fsynced),
--resume continues a conversation saved there.

Text that is not valid Unicode (bytes the terminal or the command line could not decode, which Python
hands over as lone surrogates) is refused, never replaced: --prompt or --system is an error before the
model loads, a terminal line is refused with one line on stderr and the session goes on, and a transcript
holding such text is an error naming its line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import (COUNT, FRACTION_OPEN, NON_NEGATIVE, NON_NEGATIVE_REAL, SEED, Parser, add_model_args, load_options,
                  policy_params, run_cli)
from .dist.launch import first_rank, from_rank_zero, patient_group
from .generate import SamplingParams
from .llm import LLM, ContextError, load
from .tokenizer import TEMPLATES, TextError, Tokenizer, check_text

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

PROMPT = ">>> "
HELP = """commands:
  /stats        cache occupancy per layer, KV bytes vs a full cache, evictions, merges, speed of the last reply
  /reset        forget the conversation (the system message stays)
  /system TEXT  set the system message and start over (/system alone shows it)
  /help         this text
  /quit         leave (Ctrl-D, or Ctrl-C twice, does too)
Ctrl-C during a reply stops it; what was said so far stays in the conversation."""
Message = dict[str, str]


# ---- appending a turn to the cache ---------------------------------------------------------------

def continuation(tok: Tokenizer, cached: list[int], history: list[Message], text: str) -> tuple[list[int], str]:
    """Ids that follow `cached` (the ids the cache holds for `history`, replies as the model sampled
    them) with the user message `text` and the assistant prompt. Returns (ids, path):

    - "prefix": re-rendering history + message starts with `cached` exactly: feed the rest. A fresh or
      resumed cache always takes it; so does a reply whose text re-encodes to the ids the model
      sampled, which is the usual case for chatml (SmolLM2) and vicuna ("ASSISTANT: {reply}</s>"), and a
      reply cut short whose shown text re-encodes to its ids.
    - "turn": otherwise: llama-2 after every complete reply (the template puts " " between the reply
      and </s>, which the model does not sample), a sentencepiece or BPE split the tokenizer would not
      make, or text held back by a stop string. Close the last reply with the template's end-of-turn
      ids (less the EOS the model already sampled) and append the new turn rendered on its own: each
      template renders a chat as segments encoded one by one, so rendering history and history +
      message differ by exactly the new turn's segments.
    """
    full = tok.apply_chat([*history, {"role": "user", "content": text}])
    if full[: len(cached)] == cached:
        return full[len(cached):], "prefix"
    closed = tok.apply_chat(history, add_generation_prompt=False)
    ends = [i for i, t in enumerate(closed) if t in tok.eos_ids]
    if full[: len(closed)] != closed or not ends:
        raise RuntimeError(f"internal: template {tok.template} cannot append a turn to this conversation")
    close = closed[ends[-1]:]  # end of the last reply: [EOS] (llama-2, vicuna) or [<|im_end|>, "\n"] (chatml)
    if cached and cached[-1] in tok.eos_ids:
        close = close[1:]
    return close + full[len(closed):], "turn"


@dataclass
class Reply:
    text: str  # as shown to the user
    tokens: int  # sampled, a final EOS included
    prompt_tokens: int  # fed for this turn
    stopped: str  # eos | length | stop | interrupted | context (a non-evicting cache is full)
    path: str  # how the turn was appended: prefix | turn (see `continuation`)
    prefill_s: float  # from the turn's start to its first piece of text
    decode_s: float  # from the first piece of text to the end
    decode_tokens: int  # sampled within decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class Conversation:
    """A chat kept in one Session: `turns` is what was said, the session's cache what the model saw."""

    def __init__(self, llm: LLM, params: SamplingParams, system: str | None = None):
        self.llm, self.params, self.system = llm, params, system
        self.session = llm.session(params.max_new_tokens)
        self.turns: list[Message] = []
        self.last: Reply | None = None

    @property
    def messages(self) -> list[Message]:
        return [{"role": "system", "content": self.system}] * (self.system is not None) + self.turns

    def reset(self) -> None:
        self.session.reset()
        self.turns, self.last = [], None

    def restore(self, turns: list[Message]) -> int:
        """Start over from saved turns, prefilled once; returns the number of tokens fed."""
        self.reset()
        self.turns = list(turns)
        if not turns:
            return 0
        ids = self.llm.tokenizer.apply_chat(self.messages, add_generation_prompt=False)
        self.session.feed(ids)
        return len(ids)

    def ask(self, text: str, on_piece: Callable[[str], None] = lambda piece: None,
            stop: Callable[[], bool] = lambda: False) -> Reply:
        """Append `text` as a user turn, stream the reply through `on_piece`, stop early when `stop()`
        turns true (checked after every piece). The cache and `turns` stay consistent either way."""
        s = self.session
        ids, path = continuation(self.llm.tokenizer, s.tokens + s.pending, self.messages, text)
        params = self._params(len(ids))
        start = len(s.tokens) + len(s.pending) + len(ids)  # the reply's first token lands here

        def sampled() -> int:
            return len(s.tokens) + len(s.pending) - start

        pieces: list[str] = []
        interrupted, first, first_n = False, None, 0
        t0 = time.perf_counter()
        with contextlib.closing(s.stream(ids, params)) as stream:
            for piece in stream:
                if first is None:
                    first, first_n = time.perf_counter(), sampled()
                pieces.append(piece)
                on_piece(piece)
                if stop():
                    interrupted = True
                    break
        end = time.perf_counter()
        n = max(sampled(), 0)
        reply = "".join(pieces)
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        self.last = Reply(reply, n, len(ids), self._why(interrupted, n, params), path,
                          (first or end) - t0, end - (first or end), n - first_n)
        return self.last

    def _params(self, n_feed: int) -> SamplingParams:
        """A store that never evicts while decoding (full, SnapKV) bounds the reply by its free slots."""
        store = self.session.store
        if store.policy.evicts_on_decode:
            return self.params
        after_feed = min(store.occupancy + len(self.session.pending) + n_feed, store.budget)
        room = store.capacity - after_feed + 1  # the last sampled token is not fed
        return dataclasses.replace(self.params, max_new_tokens=max(0, min(self.params.max_new_tokens, room)))

    def _why(self, interrupted: bool, n: int, params: SamplingParams) -> str:
        s = self.session
        if interrupted:
            return "interrupted"
        if n and (s.pending or s.tokens)[-1] in self.llm.tokenizer.eos_ids:
            return "eos"
        if n >= params.max_new_tokens:
            return "length" if params.max_new_tokens == self.params.max_new_tokens else "context"
        return "stop"

    def stats(self) -> str:
        """/stats: occupancy per layer, KV bytes vs a full cache, evictions, merges, last reply's speed."""
        store = self.session.store
        st = store.stats()
        valid = [float((layer.pos >= 0).float().sum(-1).mean()) for layer in store.layers]
        lo, hi = min(valid), max(valid)
        if lo == hi:
            occ = f"{lo:g} of {st.capacity} slots in each of the {len(valid)} layers"
        else:
            occ = (f"{lo:g} (layer {valid.index(lo)}) to {hi:g} (layer {valid.index(hi)}) of {st.capacity} slots, "
                   f"mean {sum(valid) / len(valid):.1f} over {len(valid)} layers")
        share = f" ({100 * st.kv_bytes / st.full_kv_bytes:.0f}%)" if st.full_kv_bytes else ""
        lines = [f"policy {store.policy.name}, budget {st.budget} tokens per layer and KV head",
                 f"occupancy per layer (valid slots per KV head): {occ}",
                 f"KV cache ({str(store.kv_dtype).removeprefix('torch.')})"
                 + (f" on each of the {store.tp.size} tensor-parallel ranks" if store.tp else "")
                 + f": {_mb(st.kv_bytes)} allocated vs "
                 f"{_mb(st.full_kv_bytes)} for a full cache of the {st.tokens_seen} tokens seen{share}",
                 f"evictions: {st.evictions} per layer and KV head, merges: {st.merges}",
                 f"conversation: {len(self.turns) // 2} turns"]
        r = self.last
        if r is not None:
            lines.append(f"last reply: {r.tokens} tokens, {r.tokens_per_s:.1f} tokens/s decoding; "
                         f"{r.prompt_tokens} new prompt tokens ({r.path} path) in {r.prefill_s:.2f} s; "
                         f"stopped by {r.stopped}")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---- transcript ---------------------------------------------------------------------------------

class Transcript:
    """Append-only JSONL, one record per line, flushed and fsynced: a crash or kill loses nothing said
    before it. Records: {"event": "start", "resumed", "system", "model", "policy"}, {"role": "user",
    "content"}, {"role": "assistant", "content", "stopped", "tokens"}, {"event": "reset", "system"};
    each with "time" (UTC, ISO 8601). Writing never fails on text: a lone surrogate (an undecodable byte
    in a model's file name, say) is written as its JSON escape \\udcXX."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
        except OSError as e:
            raise ValueError(f"cannot write the transcript {path}: {e.strerror or e}") from None

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_transcript(path: str | Path) -> tuple[str | None, list[Message]]:
    """(system message, answered turns) of the last conversation in a transcript. A user message
    without a reply (the process was killed, or the cache refused it) is left out; so is a last line
    cut off mid-write. Any other line that is not a record (not UTF-8, not JSON, nested too deep, fields
    of the wrong type, text that is not valid Unicode) is a ValueError naming the file and line."""
    try:
        lines = Path(path).read_bytes().split(b"\n")  # not splitlines: JSON leaves U+2028 and U+0085 raw
    except OSError as e:
        raise ValueError(f"cannot read the transcript {path}: {e.strerror or e}") from None
    system, turns, asked = None, [], None
    for n, raw in enumerate(lines, 1):
        where = f"{path} line {n}"
        try:
            rec = _record(raw, last=n == len(lines))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if rec is None:
            continue
        for key in ("content", "system"):  # the text a resumed conversation feeds the model
            if isinstance(rec.get(key), str):
                check_text(rec[key], where)
        content = rec.get("content")
        if rec.get("event") in ("start", "reset") and isinstance(rec.get("system"), (str, type(None))):
            if not (rec["event"] == "start" and rec.get("resumed")):
                turns, asked = [], None
            system = rec.get("system")
        elif rec.get("role") == "user" and isinstance(content, str):
            asked = content
        elif rec.get("role") == "assistant" and isinstance(content, str):
            if asked is not None:
                turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": content}]
            asked = None
        else:
            raise ValueError(f"{where}: not a transcript record")
    return system, turns


def _record(raw: bytes, last: bool) -> dict[str, Any] | None:
    """One transcript line as a dict; None for a blank line, or for the last line when it was cut off
    mid-write (no newline yet). A ValueError says why any other line is not a record."""
    if not raw.strip():
        return None
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if last:
            return None
        if isinstance(e, UnicodeDecodeError):
            raise ValueError(f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
        raise ValueError(f"not JSON ({e.msg})") from None
    except RecursionError:  # json recurses once per nesting level
        raise ValueError("not a transcript record (nested too deeply)") from None
    except ValueError as e:  # an integer with more digits than Python converts
        raise ValueError(f"not a transcript record ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError("not a transcript record")
    return rec


# ---- the terminal -------------------------------------------------------------------------------

@contextlib.contextmanager
def ctrl_c_flag() -> Iterator[Callable[[], bool]]:
    """Within the block Ctrl-C only raises a flag (read by the yielded function), so a reply stops between
    two tokens and never leaves the cache half-written."""
    hit = False

    def handler(signum: int, frame: object) -> None:
        nonlocal hit
        hit = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: hit
    finally:
        signal.signal(signal.SIGINT, previous)


def _echo(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


class Terminal:
    """Rank 0's (the only process's) input: the lines typed, checked, blank ones skipped. It ends at Ctrl-D,
    or at a second Ctrl-C in a row; `armed` says the next Ctrl-C at the prompt leaves (the last one stopped
    a reply)."""

    def __init__(self) -> None:
        self.armed = False

    def lines(self) -> Iterator[str]:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                if self.armed:
                    print()
                    return
                print("\n(Ctrl-C again or Ctrl-D to quit)")
                self.armed = True
                continue
            self.armed = False
            try:
                text = check_text(line.strip(), "the line")
            except TextError as e:
                print(f"error: {e}; it was not sent (is the terminal set to UTF-8?)", file=sys.stderr)
                continue
            if text:
                yield text


def shared_lines(own: Iterator[str], group: ProcessGroup | None) -> Iterator[str]:
    """Rank 0's lines on every rank: rank 0 reads `own` and sends each line (then its end) to the others,
    which run the same turns and ignore `own`. The wait for a line is on a patient group, so a person may
    think for longer than the collective timeout; rank 0 dying ends the others' wait at once (DistError)."""
    while True:
        text = from_rank_zero(next(own, None) if first_rank() else None, group, "waiting for rank 0's next line")
        if text is None:
            return
        yield text


def repl(conv: Conversation, transcript: Transcript | None, group: ProcessGroup | None = None) -> int:
    """The interactive session; returns the exit code (0 on /quit, Ctrl-D or a second Ctrl-C). Among
    several ranks (`group`: engine.dist.launch.patient_group) every rank runs it, rank 0 reading the terminal
    for all; a Ctrl-C that stops a reply is rank 0's, sent with each piece so every rank stops on the same one."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    # A shell that starts us in the background hands down SIGINT as ignored; in a chat Ctrl-C must work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if isinstance(sys.stdin, io.TextIOWrapper):  # undecodable bytes as surrogates, for check_text to refuse,
        sys.stdin.reconfigure(errors="surrogateescape")  # not a UnicodeDecodeError that ends the session
    terminal = Terminal()
    for text in shared_lines(terminal.lines(), group):
        if text.startswith("/"):
            if command(conv, transcript, text):
                break
            continue
        if transcript:
            transcript.write({"role": "user", "content": text})
        with ctrl_c_flag() as interrupted:
            try:
                reply = conv.ask(text, _echo, lambda: from_rank_zero(interrupted(), group, "following rank 0's reply"))
            except ContextError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
        print(" [interrupted]" if reply.stopped == "interrupted" else "")
        terminal.armed = reply.stopped == "interrupted"
        if transcript:
            transcript.write({"role": "assistant", "content": reply.text, "stopped": reply.stopped,
                              "tokens": reply.tokens})
    return 0


def command(conv: Conversation, transcript: Transcript | None, text: str) -> bool:
    """Run a /command; True means quit."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name == "/quit":
        return True
    if name == "/help":
        print(HELP)
    elif name == "/stats":
        print(conv.stats())
    elif name == "/reset" or (name == "/system" and arg):
        conv.system = arg if name == "/system" else conv.system
        conv.reset()
        if transcript:
            transcript.write({"event": "reset", "system": conv.system})
        print("(new conversation" + (f"; system: {conv.system})" if name == "/system" else ")"))
    elif name == "/system":
        shown = conv.system if conv.system is not None else conv.llm.tokenizer.default_system
        print(f"system: {shown}" if shown else "no system message")
    else:
        print(f"unknown command {name}; /help lists them")
    return False


# ---- entry point --------------------------------------------------------------------------------

def parser() -> Parser:
    p = Parser(prog="python -m engine.chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", help="answer this once and exit ('-' reads stdin); stdout gets only the answer")
    p.add_argument("--system", help="system message")
    p.add_argument("--template", choices=TEMPLATES, help="chat template (default: from the tokenizer config)")
    p.add_argument("--max-new-tokens", type=COUNT, default=256, help="longest reply (tokens, >= 1)")
    p.add_argument("--temperature", type=NON_NEGATIVE_REAL, default=0.7, help="0: greedy (finite, >= 0)")
    p.add_argument("--top-p", type=FRACTION_OPEN, default=0.9, help="nucleus mass, in (0, 1]")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="the k likeliest tokens only (0: off)")
    p.add_argument("--seed", type=SEED, help="sampling seed, 0 to 2**64 - 1")
    p.add_argument("--transcript", help="append every turn to this JSONL file")
    p.add_argument("--resume", help="continue the conversation saved in this transcript (and append to it unless "
                                    "--transcript names another file)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def read_prompt(prompt: str) -> str:
    """The --prompt text, which must be valid Unicode; '-' reads stdin, which must be UTF-8."""
    if prompt != "-":
        text = check_text(prompt, "--prompt")
    else:
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"stdin is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    sampling = dict(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                    seed=ns.seed)
    params = SamplingParams(**sampling)  # checks the values before the model loads
    prompt = read_prompt(ns.prompt) if ns.prompt is not None else None
    if ns.system is not None:
        check_text(ns.system, "--system")
    system, turns = read_transcript(ns.resume) if ns.resume else (None, [])
    system = ns.system if ns.system is not None else system
    path = ns.transcript or ns.resume
    transcript = Transcript(path) if path and first_rank() else None  # among several ranks, rank 0 writes it
    try:
        llm = load(ns.model, policy=ns.policy, template=ns.template, **load_options(ns), **policy_params(ns))
        if transcript:
            transcript.write({"event": "start", "resumed": bool(ns.resume), "system": system, "model": llm.name,
                              "policy": llm.policy.name})
        if prompt is not None:
            return answer_once(llm, sampling, system, turns, prompt, transcript)
        conv = Conversation(llm, params, system)
        fed = conv.restore(turns)
        print(f"{llm.name}: policy {llm.policy.name} (budget {conv.session.store.budget}), weights {llm.weights}, "
              f"template {llm.tokenizer.template}" + (f"; resumed {len(turns) // 2} turns ({fed} tokens)" if ns.resume else "")
              + "; /help lists commands, Ctrl-D quits")
        return repl(conv, transcript, patient_group())
    finally:
        if transcript:
            transcript.close()


def answer_once(llm: LLM, sampling: dict[str, Any], system: str | None, turns: list[Message], prompt: str,
                transcript: Transcript | None) -> int:
    """--prompt: the answer on stdout, nothing else. The cache is sized for this prompt (llm.stream)."""
    messages = [{"role": "system", "content": system}] * (system is not None) + turns
    ids = llm.tokenizer.apply_chat([*messages, {"role": "user", "content": prompt}])
    if transcript:
        transcript.write({"role": "user", "content": prompt})
    pieces = []
    for piece in llm.stream(ids, **sampling):
        pieces.append(piece)
        _echo(piece)
    print()
    if transcript:
        transcript.write({"role": "assistant", "content": "".join(pieces)})
    return 0


if __name__ == "__main__":
    run_cli(main)
