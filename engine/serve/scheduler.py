"""Continuous batching: one thread owns the model; requests join the running batch at a step boundary and
leave it when done, and every step decodes all of them at once (engine/decode/batch.py).

Each request keeps its own KVStore, sized and prefilled as LLM.stream does it (its own policy and budget),
and is sampled, stopped and turned into text as Session.stream does it (engine/generate.py's sample and
StopFilter, the tokenizer's StreamDecoder): its output does not depend on what else runs, and a greedy
reply equals `LLM.chat` on the same messages, byte for byte. Nothing here knows about HTTP: a request's
events go to a callback (the server hands them to its event loop).

Under tensor parallelism (torchrun) rank 0 schedules and the other ranks `follow`: at each step boundary rank
0 sends the requests that join (their ids, length and policy) and then each step's members and tokens (sampled
on rank 0), and the followers prefill and step the same stores in the same order, each with its KV heads.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..decode import batch
from ..dist.launch import DistError, from_rank_zero
from ..generate import SamplingParams, StopFilter, sample
from ..llm import LLM, Session
from ..policies import Policy
from ..tokenizer import StreamDecoder


class QueueFull(RuntimeError):
    """The waiting queue holds --max-queue requests already."""


@dataclass
class Done:
    """A request's last event: why it ended and what it cost."""

    finish_reason: str  # stop (EOS or a stop string) | length (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # sampled, a final EOS included
    engine: dict[str, Any]  # the cache as /stats in the chat shows it


@dataclass
class Failed:
    """A request that could not run: `status` is the HTTP status it maps to."""

    status: int
    message: str
    kind: str = "invalid_request_error"


Event = str | Done | Failed  # a text piece, or the end


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, sampling, its own policy; `emit` receives its events in order."""

    ids: list[int]
    params: SamplingParams
    policy: Policy
    emit: Callable[[Event], None]
    deadline: float  # time.monotonic() past which it ends with a timeout
    cancelled: bool = False  # set by the caller (client gone): it leaves at the next step boundary
    # filled when it joins the batch
    session: Session | None = None
    generator: torch.Generator | None = None
    text: StreamDecoder | None = None
    stops: StopFilter | None = None
    token: int = -1  # the last sampled token, fed by the next step
    sampled: int = 0
    ended: bool = field(default=False)
    num: int = -1  # its number among the requests that joined (the followers' name for it)

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """The model's one user: a thread that admits queued requests, prefills them, and decodes every
    admitted request together, one token each per step.

    `max_batch` bounds the requests decoding at once, `max_queue` those waiting (submit raises QueueFull
    beyond), and `prefill_tokens` the prompt tokens prefilled at one step boundary (at least one whole
    prompt), so that a burst of new prompts delays the running streams by a bounded amount."""

    def __init__(self, llm: LLM, max_batch: int = 16, max_queue: int = 64, prefill_tokens: int = 256,
                 group: dist.ProcessGroup | None = None):
        self.llm, self.max_batch, self.max_queue, self.prefill_tokens = llm, max_batch, max_queue, prefill_tokens
        self.group = group  # among several ranks (engine.dist.launch.patient_group): the followers listen on it
        self.failed: DistError | None = None  # the collective that ended the thread (then the server stops)
        self.joined = 0
        self.joining: list[Request] = []  # taken from the queue, not yet in the batch
        self.eos = frozenset(llm.tokenizer.eos_ids)
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0  # decode steps run (for the benchmark and tests)
        self.thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def submit(self, request: Request) -> None:
        """Queue a request (QueueFull when --max-queue are waiting)."""
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue)")
            self.waiting.append(request)
            self.wake.notify()

    def load(self) -> dict[str, int]:
        return {"active": len(self.active), "waiting": len(self.waiting)}

    # ---- the thread ------------------------------------------------------------------------------
    def _tell(self, plan: tuple | None) -> None:
        """Send the followers what comes next ("join", [(num, ids, max_new_tokens, policy)]), ("step", [num],
        [token]) or the end (None)."""
        if self.group is not None:
            from_rank_zero(plan, self.group, "sending the followers the next step")

    def _run(self) -> None:
        try:
            self._schedule()
        except DistError as e:  # a follower died: nothing can run; the server stops (serve's main says why)
            self.failed = e
            for r in [*self.joining, *self.active, *self.waiting]:
                if not r.ended:
                    self._end(r, Failed(503, "the server is shutting down", "server_error"))
            signal.raise_signal(signal.SIGTERM)
            return
        self._tell(None)

    def _schedule(self) -> None:
        step: Callable[[torch.Tensor], torch.Tensor] | None = None
        members: list[Request] = []
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.active:
                    self.wake.wait()
                if self.stopping:
                    break
                admitted = self._take()
            self.joining = [r for r in admitted if not self._leaves(r)]
            for r in self.joining:
                r.num, self.joined = self.joined, self.joined + 1
            if self.joining:
                self._tell(("join", [(r.num, r.ids, r.params.max_new_tokens, r.policy) for r in self.joining]))
            for request in self.joining:
                self._join(request)
            self.active = [r for r in self.active if not self._leaves(r)]
            if not self.active:
                continue
            if members != self.active:
                members, step = list(self.active), self._step_for([r.session for r in self.active])
            self._tell(("step", [r.num for r in members], [r.token for r in members]))
            tokens = torch.tensor([r.token for r in members], device=self.llm.device)
            try:
                logits = step(tokens)
            except DistError:
                raise
            except Exception as e:  # a bug or out of memory: these requests end, the server goes on
                for r in members:
                    self._end(r, Failed(500, f"decode step failed: {e}", "server_error"))
                self.active, members = [], []
                continue
            self.steps += 1
            for i, r in enumerate(members):
                self._next_token(r, logits[i : i + 1])
        for r in [*self.active, *self.waiting]:
            self._end(r, Failed(503, "the server is shutting down", "server_error"))

    def _take(self) -> list[Request]:
        """Waiting requests that join now: room in the batch, within the step's prefill tokens."""
        taken, tokens = [], 0
        while self.waiting and len(self.active) + len(taken) < self.max_batch:
            n = len(self.waiting[0].ids)
            if taken and tokens + n > self.prefill_tokens:
                break
            taken.append(self.waiting.popleft())
            tokens += n
        return taken

    def _step_for(self, sessions: list[Session]) -> Callable[[torch.Tensor], torch.Tensor]:
        """One batched step over the sessions' stores where the batched plan runs (CPU); elsewhere each
        request's own decoder, one after another (same logits, no shared read of the weights)."""
        stores = [s.store for s in sessions]
        if batch.applies(self.llm.model, stores):
            return batch.BatchStep(self.llm.model, stores)
        steps = [s.step for s in sessions]
        return lambda tokens: torch.cat([s(tokens[i : i + 1]) for i, s in enumerate(steps)])

    def follow(self) -> None:
        """A follower rank's whole life: prefill and step what rank 0's plans say, until rank 0 ends."""
        sessions: dict[int, Session] = {}
        members: list[int] = []
        step: Callable[[torch.Tensor], torch.Tensor] | None = None
        while (plan := from_rank_zero(None, self.group, "waiting for rank 0's next step")) is not None:
            if plan[0] == "join":
                for num, ids, max_new_tokens, policy in plan[1]:
                    with contextlib.suppress(ValueError):  # refused on rank 0 alike
                        session = Session(self.llm.with_policy(policy), max_new_tokens, prompt_len=len(ids))
                        session.feed(ids)
                        sessions[num] = session
                continue
            nums, tokens = plan[1], plan[2]
            if nums != members:
                sessions = {n: sessions[n] for n in nums}  # the others left: their caches go
                members, step = nums, self._step_for([sessions[n] for n in nums])
            step(torch.tensor(tokens, device=self.llm.device))

    def _join(self, r: Request) -> None:
        """Prefill a request alone, as LLM.stream does, and sample its first token (the followers prefill it too)."""
        try:
            r.session = Session(self.llm.with_policy(r.policy), r.params.max_new_tokens, prompt_len=len(r.ids))
            if r.params.seed is not None:
                r.generator = torch.Generator(device=self.llm.device).manual_seed(r.params.seed)
            logits = r.session.feed(r.ids)
        except DistError:
            raise
        except ValueError as e:  # ContextError, PolicyError, bad ids: the request's fault
            return self._end(r, Failed(400, str(e)))
        except Exception as e:  # out of memory for this cache: the next request may fit
            return self._end(r, Failed(500, f"prefill failed: {e}", "server_error"))
        tok = self.llm.tokenizer
        r.text, r.stops = StreamDecoder(tok), StopFilter(tuple(r.params.stop) + tok.stop_strings)
        self.active.append(r)
        self._next_token(r, logits)

    def _next_token(self, r: Request, logits: torch.Tensor) -> None:
        """Sample, and emit the text it completes; end the request on EOS, a stop string or max_tokens."""
        tid = int(sample(logits, r.params, r.generator)[0])
        r.sampled += 1
        r.token = tid
        if tid in self.eos:
            return self._finish(r, "stop")
        piece = r.stops.feed(r.text.push(tid))
        if piece:
            r.emit(piece)
        if r.stops.stopped:
            return self._finish(r, "stop")
        if r.sampled == r.params.max_new_tokens:
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str) -> None:
        tail = r.stops.feed(r.text.flush()) + r.stops.flush()
        if tail:
            r.emit(tail)
        store = r.session.store
        engine = {"policy": store.policy.name, **dataclasses.asdict(store.stats())}
        self._end(r, Done(reason, len(r.ids), r.sampled, engine))

    def _leaves(self, r: Request) -> bool:
        """Whether an active request leaves at this step boundary: done, cancelled or past its deadline."""
        if not r.ended and (r.cancelled or time.monotonic() > r.deadline):
            self._end(r, self._gone(r))
        return r.ended

    def _gone(self, r: Request) -> Failed:
        if r.cancelled:
            return Failed(499, "request cancelled by the client")
        return Failed(408, "request timed out (--request-timeout)", "timeout")

    def _end(self, r: Request, event: Done | Failed) -> None:
        r.ended = True
        r.session = None  # the cache goes now, not when the HTTP side lets go of the request
        r.emit(event)
