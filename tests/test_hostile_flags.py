"""Numbers from flags and arguments (issue 17, class 2) and OS errors of the CLIs (class 5).

Every numeric flag of every command takes one of engine.cli's shared argument types; fuzzed here through each
command's real parser, a value either parses into what the type promises or ends in exit code 2 with one line
on stderr that names the flag, never a traceback. The library (SamplingParams, policies) refuses the same
values with a ValueError naming the argument. run_cli turns every OSError into one line, and an eval --out
that cannot be written is found before anything loads, leaving nothing behind.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import importlib
import io
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import engine
from engine import bench, chat, profile
from engine.cli import BUDGETS, COUNT, FRACTION, FRACTION_OPEN, SEED, CommaList, Integer, Parser, Real, budget_arg, \
    policy_params, run_cli
from engine.eval import common
from engine.eval.__main__ import main as eval_main
from engine.eval.__main__ import parser as eval_parser
from engine.generate import SamplingParams, sample
from engine.policies import list_policies, make_policy, policy_class
from engine.results import write_json

README = Path(__file__).resolve().parent.parent / "README.md"
FUZZ = settings(max_examples=100, deadline=None)

# ---- what to throw at a flag ------------------------------------------------------------------

ODD = ["nan", "-nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999", "1e-400", "-0", "-0.0", "0", "0.0", "1",
       "1.0", "0.5", "1.5", "2", "-1", "-2", "1e3", "0x10", "1_000", " 7 ", "", " ", "True", "None", "9" * 5000,
       "1,2", "0.5,1.5", ",", "3,0", "0,1,", "\n", "5\n6", "\udcff", "\x00", "18446744073709551616", "1024", "1025"]
VALUES = st.one_of(
    st.sampled_from(ODD),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.one_of(st.integers(-3, 5000).map(str), st.floats(-2, 2).map(repr)), min_size=1, max_size=4
             ).map(",".join),
    st.text(max_size=12),
)


def honours(kind: Callable[[str], object], value: object) -> bool:
    """Whether a parsed value is what its type promises: an int in range, a finite number in range, a budget."""
    if isinstance(kind, CommaList):
        return isinstance(value, list) and len(value) > 0 and all(honours(kind.item, v) for v in value)
    if isinstance(kind, Integer):
        return (type(value) is int and (kind.lo is None or value >= kind.lo)
                and (kind.hi is None or value <= kind.hi))
    if isinstance(kind, Real):
        return type(value) is float and math.isfinite(value) and kind.contains(value)
    assert kind is budget_arg
    return (type(value) is int and value >= 1) or (type(value) is float and 0 < value <= 1)


# ---- the shared types ---------------------------------------------------------------------------

SHARED = [Integer(), COUNT, Integer(2), Integer(-1), SEED, Real(), Real(0.0), FRACTION, FRACTION_OPEN, budget_arg,
          BUDGETS, CommaList(COUNT), CommaList(FRACTION)]


@pytest.mark.parametrize("kind", SHARED, ids=repr)
@FUZZ
@given(text=VALUES)
def test_a_shared_type_returns_what_it_promises_or_says_why_in_one_line(kind, text: str) -> None:
    try:
        value = kind(text)
    except argparse.ArgumentTypeError as e:
        assert str(e).startswith("must ") and "\n" not in str(e) and len(str(e)) < 1000, str(e)
    else:
        assert honours(kind, value), (text, value)


@pytest.mark.parametrize("kind,text", [
    (Real(), "nan"), (Real(), "inf"), (Real(0.0), "-inf"), (Real(0.0), "-1"), (FRACTION_OPEN, "0"),
    (FRACTION_OPEN, "1.0000001"), (FRACTION_OPEN, "1e-400"), (FRACTION, "nan"), (COUNT, "0"), (COUNT, "-3"),
    (COUNT, "1.5"), (COUNT, "nan"), (SEED, "-1"), (SEED, str(2**64)), (budget_arg, "1.5"), (budget_arg, "0"),
    (budget_arg, "-0.5"), (budget_arg, "nan"), (budget_arg, "inf"), (budget_arg, "1e3"), (budget_arg, "True"),
    (BUDGETS, "0.5,1.5"), (BUDGETS, ","), (CommaList(COUNT), "1024,0"),
])
def test_what_means_nothing_is_refused(kind, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="^must "):
        kind(text)


def test_a_budget_is_tokens_or_a_fraction() -> None:
    assert budget_arg("256") == 256 and type(budget_arg("256")) is int
    assert budget_arg("1") == 1 and type(budget_arg("1")) is int  # one token, not the whole prompt
    assert budget_arg("1.0") == 1.0 and type(budget_arg("1.0")) is float
    assert BUDGETS("0.25, 0.5,64,") == [0.25, 0.5, 64]


# ---- every command's numeric flags, through its own parser ------------------------------------------------

def eval_sub(name: str) -> Parser:
    """The flags of one eval subcommand, added as engine.eval's main adds them."""
    p = Parser()
    importlib.import_module(f"engine.eval.{name}").add_args(p)
    return p


PARSE = {"chat": functools.cache(chat.parser), "profile": functools.cache(profile.parser),
         "bench": functools.cache(lambda: bench.parsers()[0]), "eval": functools.cache(eval_parser)}


def parsing(command: str) -> Callable[[list[str]], argparse.Namespace]:
    """The command's real parser, built once (a parse does not change it)."""
    return lambda argv: PARSE[command]().parse_args(argv)


MODEL_FLAGS = {"--budget", "--sinks", "--recent", "--prefill-chunk", "--threads", "--k", "--m", "--pool-kernel", "--r",
               "--w", "--min-share", "--pyramid-beta", "--merge-window", "--min-similarity"}
COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], list[str], Callable, set[str]]] = {
    # name: (the parser whose flags to fuzz, argv before the flag, how the command parses, its numeric flags)
    "chat": (chat.parser, [], parsing("chat"),
             MODEL_FLAGS | {"--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed"}),
    "profile": (profile.parser, [], parsing("profile"), MODEL_FLAGS | {"--context", "--steps"}),
    "bench model": (lambda: bench.parsers()[1]["model"], ["model"], parsing("bench"),
                    MODEL_FLAGS | {"--contexts", "--steps", "--reps", "--budgets"}),
    "bench kernels": (lambda: bench.parsers()[1]["kernels"], ["kernels"], parsing("bench"),
                      {"--contexts", "--reps", "--threads"}),
    "bench gpu": (lambda: bench.parsers()[1]["gpu"], ["gpu"], parsing("bench"),
                  {"--contexts", "--budget", "--steps", "--threads"}),
    "bench distributed": (lambda: bench.parsers()[1]["distributed"], ["distributed"], parsing("bench"),
                          MODEL_FLAGS | {"--ranks", "--rounds", "--context", "--steps"}),
    "eval ppl": (lambda: eval_sub("ppl"), ["ppl", "--text", "t"], parsing("eval"),
                 MODEL_FLAGS | {"--budgets", "--tp", "--tokens", "--batch", "--window"}),
    "eval retrieval": (lambda: eval_sub("retrieval"), ["retrieval"], parsing("eval"),
                       MODEL_FLAGS | {"--budgets", "--tp", "--lengths", "--depths", "--samples", "--seed"}),
    "eval longbench": (lambda: eval_sub("longbench"), ["longbench", "--data", "d"], parsing("eval"),
                       MODEL_FLAGS | {"--budgets", "--tp", "--limit", "--max-length"}),
    "eval analysis": (lambda: eval_sub("analysis"), ["analysis", "--text", "t"], parsing("eval"),
                      MODEL_FLAGS | {"--tokens", "--sink-tokens", "--top", "--bins"}),
}


def numeric_flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags of `p` typed by one of the shared argument types."""
    return {a.option_strings[0]: a for a in p._actions
            if a.option_strings and (a.type is budget_arg or isinstance(a.type, (Integer, Real, CommaList)))}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_numeric_flag_has_a_shared_type(command: str) -> None:
    make, _, _, flags = COMMANDS[command]
    assert set(numeric_flags(make())) == flags


@contextlib.contextmanager
def threads_kept():
    """--threads sets torch's thread count as it is parsed: put it back."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parse_or_error(parse: Callable, argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """(namespace, "") on a clean parse, else (None, stderr) after asserting argparse's exit code 2."""
    err = io.StringIO()
    with threads_kept(), contextlib.redirect_stderr(err):
        try:
            return parse(argv), ""
        except SystemExit as e:
            assert e.code == 2, (argv, e.code, err.getvalue())
    return None, err.getvalue()


def one_line_naming(stderr: str, flag: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(data=st.data())
def test_a_numeric_flag_parses_to_what_it_promises_or_exits_2_naming_it(command: str, data: st.DataObject) -> None:
    make, prefix, parse, _ = COMMANDS[command]
    actions = numeric_flags(make())
    flag = data.draw(st.sampled_from(sorted(actions)), label="flag")
    text = data.draw(VALUES, label="value")
    ns, stderr = parse_or_error(parse, [*prefix, f"{flag}={text}"])
    if ns is None:
        one_line_naming(stderr, flag)
        return
    action = actions[flag]
    value = getattr(ns, action.dest)
    for v in value if action.nargs == "+" else [value]:
        assert honours(action.type, v), (flag, text, v)


@FUZZ
@given(policy=st.sampled_from([n for n in list_policies() if n != "full"]),
       flag=st.sampled_from(["--budget", "--sinks", "--recent", "--k", "--m", "--pool-kernel", "--r", "--w"]),
       text=VALUES)
@example(policy="snapkv", flag="--k", text="4")
@example(policy="scissorhands", flag="--m", text="1")
def test_a_policy_flag_is_a_policy_or_one_clear_error(policy: str, flag: str, text: str) -> None:
    """Through the flags into the policy's dataclass: a ValueError (PolicyError) is run_cli's one line."""
    ns, stderr = parse_or_error(parsing("chat"), ["--policy", policy, f"{flag}={text}"])
    if ns is None:
        one_line_naming(stderr, flag)
        return
    try:
        made = make_policy(policy, **policy_params(ns))
    except ValueError as e:
        assert "\n" not in str(e) and (policy in str(e) or flag in str(e)), str(e)
    else:
        assert isinstance(made, policy_class(policy))


# ---- the library --------------------------------------------------------------------------------

NASTY = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.booleans(),
                  st.none(), st.text(max_size=3), st.just(torch.tensor(0.5)))


@FUZZ
@given(field=st.sampled_from(["max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"]), value=NASTY)
@example(field="temperature", value=float("nan"))
@example(field="top_p", value=float("inf"))
@example(field="max_new_tokens", value=True)
def test_sampling_params_refuse_what_sampling_cannot_use(field: str, value: object) -> None:
    try:
        params = SamplingParams(**{field: value})
    except ValueError as e:
        assert field in str(e) and "\n" not in str(e)
        return
    got = getattr(params, field)
    if field in ("temperature", "top_p"):
        assert not isinstance(got, bool) and math.isfinite(got)
    elif field != "stop" and got is not None:
        assert type(got) is int and got >= 0


@FUZZ
@given(policy=st.sampled_from(list_policies()), field=st.sampled_from(["budget", "sinks", "recent", "k", "m",
                                                                       "pool_kernel", "r", "w"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.booleans()))
@example(policy="h2o", field="budget", value=float("nan"))
@example(policy="h2o", field="sinks", value=float("nan"))
@example(policy="tova", field="budget", value=True)
def test_a_policy_refuses_numbers_that_mean_nothing(policy: str, field: str, value: object) -> None:
    if field not in {f for f, _, _ in policy_class(policy).options()}:
        return
    try:
        made = make_policy(policy, **({"budget": 64} if field != "budget" else {}), **{field: value})
    except ValueError as e:
        assert "\n" not in str(e) and policy in str(e), str(e)
        return
    got = getattr(made, field)
    if policy != "full":  # full keeps the whole context and ignores every parameter
        assert not isinstance(got, bool) and math.isfinite(got)


def test_a_tiny_temperature_is_greedy_not_token_zero() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1)) * 20
    logits[:, 0] = -50  # token 0 is the worst: a NaN race picks it
    for temperature in (1e-30, 1e-40, 1e-300, 5e-324):
        got = sample(logits, SamplingParams(temperature=temperature, top_p=0.9), torch.Generator().manual_seed(0))
        assert torch.equal(got, logits.argmax(-1)), temperature


def test_a_prefill_chunk_below_one_is_refused_by_the_library(tiny_model_dir: Path) -> None:
    llm = engine.load(tiny_model_dir)
    for chunk in (0, -4):
        llm.prefill_chunk = chunk
        with pytest.raises(ValueError, match="prefill chunk must be an int >= 1"):
            llm.generate("hello", max_new_tokens=1)


# ---- the examples, end to end -------------------------------------------------------------

def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def run_in_process(main: Callable[[list[str]], int], argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) under run_cli, as `python -m` runs it: (exit code, stderr)."""
    with threads_kept(), pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv))
    return info.value.code, capsys.readouterr().err


def test_nan_temperature_and_zero_steps_are_one_line_before_anything_loads(tiny_model_dir: Path) -> None:
    model = ("--model", str(tiny_model_dir))
    procs = {"--temperature must be a finite number, got 'nan'": cli("engine.chat", *model, "--prompt", "hi",
                                                                     "--temperature", "nan"),
             "--steps must be at least 1": cli("engine.bench", *model, "--steps", "0")}
    for needle, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and out == "", (needle, out, err)
        one_line_naming(err, needle)


@pytest.mark.parametrize("main,argv", [
    (chat.main, ["--prefill-chunk", "-4"]),
    (profile.main, ["--prefill-chunk=-1"]),
    (bench.main, ["--prefill-chunk", "-3"]),
    (eval_main, ["ppl", "--text", str(README), "--prefill-chunk", "0"]),
])
def test_a_negative_prefill_chunk_is_refused_everywhere(main, argv: list[str], capsys) -> None:
    code, err = run_in_process(main, argv, capsys)
    assert code == 2
    one_line_naming(err, "--prefill-chunk must be at least 1")


@pytest.mark.parametrize("main,argv", [
    (chat.main, ["--policy", "h2o", "--budget", "1.5"]),
    (profile.main, ["--policy", "h2o", "--budget", "1.5"]),
    (bench.main, ["--policy", "h2o", "--budget", "1.5"]),
    (bench.main, ["--policies", "h2o", "--budgets", "16", "1.5"]),
    (eval_main, ["ppl", "--text", str(README), "--policy", "h2o", "--budget", "1.5"]),
    (eval_main, ["retrieval", "--policies", "h2o", "--budgets", "0.5,1.5"]),
])
def test_a_fractional_budget_above_one_is_refused_alike_by_every_command(main, argv: list[str], capsys) -> None:
    code, err = run_in_process(main, argv, capsys)
    assert code == 2
    one_line_naming(err, "must be an integer >= 1 (tokens) or a fraction in (0, 1], got '1.5'")


# ---- OS errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EISDIR, errno.EIO,
                                  errno.EDQUOT])
def test_every_os_error_is_one_line(code: int, capsys) -> None:
    def main() -> int:
        raise OSError(code, os.strerror(code), "/data/out.json")

    with pytest.raises(SystemExit) as info:
        run_cli(main)
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: /data/out.json: {os.strerror(code)}\n"


def test_an_allocation_the_machine_cannot_give_is_one_line(capsys) -> None:
    """A context of 10**12 tokens reaches torch's allocator: one line, exit 2, not a traceback."""
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: torch.empty(10**13) and 0)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and err.count("\n") == 1


def test_ctrl_c_is_130_and_a_bug_keeps_its_traceback(capsys) -> None:
    def interrupted() -> int:
        raise KeyboardInterrupt

    def buggy() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(SystemExit) as info:
        run_cli(interrupted)
    assert info.value.code == 130
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(buggy)


def test_a_full_disk_under_the_transcript_or_stdout_is_one_line(tiny_model_dir: Path) -> None:
    args = ("engine.chat", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "2")
    with open("/dev/full", "w") as full:
        procs = [cli(*args, "--transcript", "/dev/full"),
                 subprocess.Popen([sys.executable, "-m", *args], stdout=full, stderr=subprocess.PIPE, text=True)]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, err
            one_line_naming(err, os.strerror(errno.ENOSPC))


# ---- eval output ----------------------------------------------------------------------------------

@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model or text load fails the test: an --out error must come first."""
    def loaded(*args, **kw):
        raise AssertionError("loaded before --out was checked")

    monkeypatch.setattr(common, "load_llm", loaded)
    monkeypatch.setattr(engine, "load", loaded)
    for name in ("ppl", "analysis"):
        monkeypatch.setattr(importlib.import_module(f"engine.eval.{name}").data, "read_text_file", loaded)


def unwritable_outs(tmp_path: Path) -> list[Path]:
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    outs = [tmp_path / "file" / "r.json", tmp_path / "folder", tmp_path / "file" / "deeper" / "r.json"]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        outs.append(locked / "r.json")
    if Path("/sys").is_dir():
        outs.append(Path("/sys/engine-test/r.json"))  # read-only even for root
    return outs


@pytest.mark.parametrize("eval_args", [["ppl", "--text", str(README), "--policy", "h2o", "--budget", "16"],
                                       ["analysis", "--text", str(README)],
                                       ["retrieval", "--policies", "full"]])
def test_an_unwritable_eval_out_fails_before_anything_loads_and_leaves_nothing(
        eval_args: list[str], tmp_path: Path, nothing_loads: None, capsys) -> None:
    for out in unwritable_outs(tmp_path):
        before = sorted(tmp_path.rglob("*"))
        code, err = run_in_process(eval_main, [*eval_args, "--out", str(out)], capsys)
        assert code == 2
        one_line_naming(err, f"cannot write --out {out}")
        assert sorted(tmp_path.rglob("*")) == before


def test_a_writable_out_is_checked_without_a_trace(tmp_path: Path) -> None:
    common.check_out(tmp_path / "new" / "r.json")  # the folder is made, the probe file gone
    assert [p.name for p in tmp_path.rglob("*")] == ["new"]


def test_a_results_file_is_whole_or_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = write_json(tmp_path / "r.json", {"cells": [1]})
    real_write = Path.write_text

    def disk_full(self: Path, text: str, **kw) -> int:
        real_write(self, text[: len(text) // 2], **kw)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError):
        write_json(out, {"cells": [1, 2]})
    assert out.read_text() == '{\n "cells": [\n  1\n ]\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
