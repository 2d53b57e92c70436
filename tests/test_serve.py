"""`engine.serve` end to end: the official `openai` client against a server on a free loopback port, the
real default model, concurrent clients decoded together, and every refused request answered with
OpenAI's error JSON while the server goes on serving."""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import urllib.parse
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch

pytest.importorskip("fastapi", reason="the extra `serve`")
pytest.importorskip("uvicorn", reason="the extra `serve`")
import openai  # noqa: E402

from engine import policies  # noqa: E402
from engine.policies import DecodeView, Policy, PrefillView, make_policy  # noqa: E402
from engine.serve.app import Settings, create_app  # noqa: E402
from engine.serve.app import serving as app_serving  # noqa: E402
from engine.serve.scheduler import Scheduler  # noqa: E402

KEY = "test-key"
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello in Spanish."]


@dataclasses.dataclass
class Tilt(Policy):
    """A custom policy with a parameter of its own: evict by key norm, scaled by `lean` (its sign decides)."""

    lean: float = 1.0
    name: ClassVar[str] = "tilt"

    def prefill_scores(self, view: PrefillView) -> torch.Tensor:
        return self.lean * view.k.float().norm(dim=-1)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return self.lean * view.k.float().norm(dim=-1)


@contextlib.contextmanager
def serving(llm, scheduler: Scheduler, **settings: object) -> Iterator[str]:
    """The app over `scheduler`, served on a free loopback port; yields its base URL."""
    with app_serving(create_app(llm, scheduler, Settings(model_names=(llm.name,), api_key=KEY, **settings))) as url:
        yield url


@pytest.fixture(scope="module", autouse=True)
def tilt_registered() -> Iterator[None]:
    """Tilt is a policy by name for this module's tests only (every command's flags list the registered ones)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(policies._REGISTRY, Tilt.name, Tilt)
        yield


@pytest.fixture(scope="module")
def server(smollm):
    scheduler = Scheduler(smollm, max_batch=16, max_queue=64).start()
    with serving(smollm, scheduler, max_prompt_tokens=2048, max_body_bytes=1 << 16) as url:
        yield url, scheduler
    scheduler.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _alone(llm, policy: str, **params: object) -> object:
    """The model under another policy, as a request choosing it gets (for one-at-a-time references)."""
    return llm.with_policy(make_policy(policy, **params))


def _chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_openai_client(client, smollm):
    """Chat and completions, streamed and not, under the server's policy, another one and a custom one with
    its own parameter (extra_body): greedy answers equal LLM.chat / LLM.generate, byte for byte."""
    assert [m.id for m in client.models.list()] == [smollm.name]
    messages = _chat(QUESTIONS[0])
    expected = smollm.chat(messages, max_new_tokens=12, temperature=0.0)
    r = client.chat.completions.create(model=smollm.name, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(smollm.tokenizer.apply_chat(messages)) and r.usage.completion_tokens >= 1
    assert r.model_extra["engine"]["policy"] == "full"
    chunks = list(client.chat.completions.create(model=smollm.name, messages=messages, max_tokens=12,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    prompt = "The three primary colours are"
    expected = smollm.generate(prompt, max_new_tokens=10, temperature=0.0)
    r = client.completions.create(model=smollm.name, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 10
    streamed = client.completions.create(model=smollm.name, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected

    long = _chat(" ".join(QUESTIONS * 2))  # longer than the budgets: the prompt is compressed
    for policy, params in [("streaming", dict(budget=16, sinks=4)), ("tilt", dict(budget=20, lean=-1.0))]:
        expected = _alone(smollm, policy, **params).chat(long, max_new_tokens=8, temperature=0.0)
        r = client.chat.completions.create(model=smollm.name, messages=long, max_tokens=8, temperature=0,
                                           extra_body={"policy": policy, **params})
        assert r.choices[0].message.content == expected
        engine = r.model_extra["engine"]
        assert engine["policy"] == policy and engine["budget"] == params["budget"] and engine["evictions"] > 0


@dataclasses.dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    text: str

    def json(self) -> object:
        return json.loads(self.text)


@contextlib.contextmanager
def _request(url: str, method: str, path: str, body: bytes | None = None, key: str | None = KEY
             ) -> Iterator[http.client.HTTPResponse]:
    """A plain HTTP request (the stdlib's client: a raw body, a connection closed at will)."""
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        conn.request(method, path, body=body, headers=headers)
        yield conn.getresponse()
    finally:
        conn.close()


def _call(url: str, method: str, path: str, body: object = None, key: str | None = KEY) -> Reply:
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    with _request(url, method, path, raw, key) as r:
        return Reply(r.status, r.headers, r.read().decode())


def _post(url: str, body: object, key: str | None = KEY) -> Reply:
    return _call(url, "POST", "/v1/chat/completions", body, key)


def test_concurrent_clients_are_batched_and_unmixed(server, client, smollm):
    """32 clients at once (completions and chat, streamed and not, two policies), and one that walks away
    mid-stream: every answer is its one-at-a-time answer, and the steps decoded several requests at once."""
    url, scheduler = server
    policies = [("full", {}), ("h2o", dict(budget=6, recent=2))]
    prompts = [_chat(QUESTIONS[0]), "The capital of France is", "Two plus two is", "My favourite colour is"]
    expected = {(i, p): (_alone(smollm, p, **params).chat(q, max_new_tokens=6, temperature=0.0) if i == 0
                         else _alone(smollm, p, **params).generate(q, max_new_tokens=6, temperature=0.0))
                for i, q in enumerate(prompts) for p, params in policies}

    def ask(i: int) -> tuple[tuple[int, str], str]:
        """Client i: prompt i % 4 (0: a chat), policy i // 4 % 2, streamed when i is odd."""
        q, (p, params) = prompts[i % len(prompts)], policies[i // len(prompts) % len(policies)]
        kw = dict(model=smollm.name, max_tokens=6, temperature=0, stream=bool(i % 2),
                  extra_body={"policy": p, **params})
        if i % len(prompts) == 0:
            r = client.chat.completions.create(messages=q, **kw)
            text = "".join(c.choices[0].delta.content or "" for c in r) if i % 2 else r.choices[0].message.content
        else:
            r = client.completions.create(prompt=q, **kw)
            text = "".join(c.choices[0].text for c in r) if i % 2 else r.choices[0].text
        return (i % len(prompts), p), text

    def walk_away() -> None:
        body = {"messages": _chat(QUESTIONS[0]), "max_tokens": 500, "stream": True}
        with _request(url, "POST", "/v1/chat/completions", json.dumps(body).encode()) as r:
            assert r.readline().startswith(b"data: ")  # the first chunk, then the connection closes

    steps = scheduler.steps
    with concurrent.futures.ThreadPoolExecutor(33) as pool:
        gone = pool.submit(walk_away)
        answers = list(pool.map(ask, range(32), timeout=120))
        gone.result(timeout=60)
    assert [got for _, got in answers] == [expected[key] for key, _ in answers]
    assert scheduler.steps - steps < 32 * 6 / 4  # decoded together: far fewer steps than tokens
    deadline = time.monotonic() + 10
    while _call(url, "GET", "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _call(url, "GET", "/health").json() == {"status": "ok", "active": 0, "waiting": 0}


BAD = [  # (why, request body or raw bytes, status, the message says)
    ("malformed JSON", b'{"messages": [', 400, "malformed JSON"),
    ("not an object", [1, 2], 400, "must be an object"),
    ("messages not a list", {"messages": "hi"}, 400, "messages must be a list"),
    ("a message without content", {"messages": [{"role": "user"}]}, 400, "message 0"),
    ("max_tokens a string", {"messages": _chat("hi"), "max_tokens": "5"}, 400, "max_tokens must be an integer"),
    ("temperature negative", {"messages": _chat("hi"), "temperature": -1}, 400, "temperature must be >= 0"),
    ("stream not a bool", {"messages": _chat("hi"), "stream": "yes"}, 400, "stream must be true or false"),
    ("unknown model", {"model": "gpt-9", "messages": _chat("hi")}, 404, "unknown model"),
    ("unknown policy", {"messages": _chat("hi"), "policy": "lru"}, 400, "unknown policy"),
    ("budget below sinks + recent", {"messages": _chat("hi"), "policy": "streaming", "budget": 4, "sinks": 4},
     400, "must exceed sinks + recent"),
    ("an unknown parameter", {"messages": _chat("hi"), "policy": "h2o", "budget": 16, "window": 3}, 400, "window"),
    ("n > 1", {"messages": _chat("hi"), "n": 2}, 400, "n must be 1"),
    ("tools", {"messages": _chat("hi"), "tools": [{"type": "function"}]}, 400, "tools is not supported"),
    ("logprobs", {"messages": _chat("hi"), "logprobs": True}, 400, "logprobs are not supported"),
    ("prompt over the limit", {"messages": _chat("word " * 2100)}, 400, "exceeds the server's limit"),
    ("prompt + reply over the context", {"messages": _chat("hi"), "max_tokens": 9000}, 400,
     "exceeds the model context"),
    ("body over the limit", {"messages": _chat("x" * 70000)}, 413, "over the server's limit"),
]


@pytest.mark.parametrize("why, body, status, says", BAD, ids=[b[0] for b in BAD])
def test_refused_requests_get_openai_errors(server, why, body, status, says):
    url, _ = server
    _assert_error(_post(url, body), status, says)
    ok = _post(url, {"messages": _chat("hi"), "max_tokens": 2})
    assert ok.status == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def _assert_error(r: Reply, status: int, says: str) -> None:
    assert r.status == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and says in error["message"], error


def test_api_key_and_unknown_routes(server):
    url, _ = server
    _assert_error(_post(url, {"messages": _chat("hi")}, key=None), 401, "API key")
    _assert_error(_post(url, {"messages": _chat("hi")}, key="wrong"), 401, "API key")
    _assert_error(_call(url, "GET", "/v1/models", key=None), 401, "API key")
    _assert_error(_call(url, "GET", "/v1/nothing"), 404, "Not Found")
    assert _call(url, "GET", "/health", key=None).status == 200  # open: load balancers poll it


def test_full_queue_and_timeout(smollm):
    """A scheduler that takes nothing (never started): the second request finds the queue full (503 with
    Retry-After), the first times out (408)."""
    idle = Scheduler(smollm, max_queue=1)
    with serving(smollm, idle, request_timeout=1.5) as url:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, url, {"messages": _chat("hi")})
            while not idle.waiting:
                time.sleep(0.01)
            full = _post(url, {"messages": _chat("hi")})
            _assert_error(full, 503, "busy")
            assert full.headers["Retry-After"] == "1"
            _assert_error(first.result(timeout=30), 408, "timed out")


def test_stream_is_server_sent_events(server):
    url, _ = server
    body = {"messages": _chat("hi"), "max_tokens": 3, "stream": True, "temperature": 0}
    with _request(url, "POST", "/v1/chat/completions", json.dumps(body).encode()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.read().decode().splitlines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] and last["usage"]["completion_tokens"] >= 1
    assert set(last["engine"]) >= {"policy", "budget", "occupancy", "evictions"}


def test_bench_serve(tiny_model_dir, tmp_path, monkeypatch):
    """`python -m engine.bench serve` on a tiny model: a row per stream count, the JSON and the page written."""
    from engine.bench import main

    monkeypatch.setenv("ENGINE_BENCH_DIR", str(tmp_path))
    page = tmp_path / "SERVE.md"
    assert main(["serve", "--model", str(tiny_model_dir), "--streams", "1,3", "--max-tokens", "4",
                 "--page", str(page)]) == 0
    [result] = tmp_path.glob("serve-*.json")
    rows = json.loads(result.read_text())["results"]
    assert [r["streams"] for r in rows] == [1, 3] and all(r["tokens"] > 0 for r in rows)
    assert "| 3 |" in page.read_text()


def test_a_gguf_model_serves_with_llama_cpps_arithmetic(tmp_path):
    """Unless --weights says otherwise, a .gguf model (the default model too) serves packed-q8act, as llama.cpp's
    server computes; a folder loads as engine.load would (None); --weights is taken as given."""
    from engine.cli import server_load_options
    from engine.serve.__main__ import parser

    def weights(*argv: str) -> str | None:
        return server_load_options(parser().parse_args(list(argv)))["weights"]

    assert weights() == "packed-q8act" and weights("--model", str(tmp_path / "m.gguf")) == "packed-q8act"
    assert weights("--model", str(tmp_path)) is None
    assert weights("--weights", "packed") == "packed" and weights("--weights", "dequantize") == "dequantize"
