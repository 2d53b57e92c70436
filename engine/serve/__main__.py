"""`python -m engine.serve`: an OpenAI-compatible server (GET /v1/models, POST /v1/chat/completions and
/v1/completions, streaming or not; GET /health). The flags' policy and budget are the defaults; a request
may choose its own (`policy`, `budget`, `sinks`, `recent` and a policy's parameters beside OpenAI's fields,
`extra_body` in OpenAI's client). Concurrent requests decode together, one weight read per step.

    python -m engine.serve --policy h2o --budget 256 --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

--api-key (or $ENGINE_API_KEY) requires `Authorization: Bearer KEY` on every route but /health.
Under torchrun rank 0 serves and schedules; the other ranks hold their part of the model and follow it.
"""
from __future__ import annotations

import argparse
import os
import signal

from ..cli import COUNT, Integer, Parser, Real, add_model_args, policy_params, run_cli, server_load_options
from ..dist.launch import first_rank, patient_group
from ..tokenizer import TEMPLATES

API_KEY_ENV = "ENGINE_API_KEY"


def parser() -> Parser:
    p = Parser(prog="python -m engine.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--template", choices=TEMPLATES, help="chat template (default: from the tokenizer config)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=Integer(0, 65535), default=8000, help="TCP port (0: any free one)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require Authorization: Bearer KEY (default ${API_KEY_ENV}; unset: no key)")
    p.add_argument("--max-batch", type=COUNT, default=16, help="requests decoded together at most")
    p.add_argument("--max-queue", type=COUNT, default=64, help="requests waiting at most; beyond, 503 with Retry-After")
    p.add_argument("--prefill-tokens", type=COUNT, default=256,
                   help="prompt tokens prefilled between two decode steps (at least one whole prompt)")
    p.add_argument("--max-tokens", type=COUNT, default=256, help="reply length when a request gives no max_tokens")
    p.add_argument("--max-prompt-tokens", type=COUNT, help="longest prompt (default: the model's context)")
    p.add_argument("--request-timeout", type=Real(0.0, open_lo=True), default=600.0, help="seconds per request")
    p.add_argument("--max-body-bytes", type=COUNT, default=1 << 20, help="largest request body")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        import uvicorn

        from .app import Settings, create_app
    except ImportError as e:
        raise ValueError(f"the server needs the extra `serve` (pip install -e '.[serve]'): {e}") from None
    from ..llm import load
    from .scheduler import Scheduler

    params = policy_params(ns)
    llm = load(ns.model, policy=ns.policy, template=ns.template, **server_load_options(ns), **params)
    group = patient_group()  # rank 0's plans reach the followers however long the server idles
    options = dict(max_batch=ns.max_batch, max_queue=ns.max_queue, prefill_tokens=ns.prefill_tokens, group=group)
    if not first_rank():
        Scheduler(llm, **options).follow()
        return 0
    settings = Settings(model_names=(llm.name, ns.model), policy=ns.policy,
                        policy_defaults={k: v for k, v in params.items() if v is not None},
                        max_tokens=ns.max_tokens, max_prompt_tokens=ns.max_prompt_tokens or llm.args.max_seq_len,
                        request_timeout=ns.request_timeout, max_body_bytes=ns.max_body_bytes, api_key=ns.api_key)
    scheduler = Scheduler(llm, **options).start()
    # uvicorn stops gracefully on SIGTERM, then raises it again: handled here, so that the scheduler stops
    # (telling the other ranks) and the exit code is 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.run(create_app(llm, scheduler, settings), host=ns.host, port=ns.port, log_level="warning")
    finally:
        scheduler.stop()
    if scheduler.failed:
        raise scheduler.failed
    return 0


if __name__ == "__main__":
    run_cli(main)
