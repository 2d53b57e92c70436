"""The library object: a loaded model, its tokenizer and an eviction policy, behind a small API."""
from __future__ import annotations

import copy

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .config import ModelArgs
from .decode import Decoder
from .dist import TensorParallel, init_from_env
from .generate import SamplingParams, StopFilter, prefill, sample
from .kv import CacheStats, KVStore, make_store, parse_kv_dtype
from .model import Transformer
from .policies import Policy, PolicyError, make_policy
from .quant import PACKED_MODES
from .rope import Rope
from .tokenizer import StreamDecoder, Tokenizer
from .weights import WeightsError, parse_dtype


class ContextError(ValueError):
    """A prompt that does not fit the model's context under the chosen policy."""


def token_ids(ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`ids` ([T] or [B, T], a list or an integer tensor) as an int64 tensor [B, T], or ValueError saying
    what is wrong. Every entry that takes ids goes through here: torch would silently cast float and bool
    ids, and an id outside the embedding would surface as an index error deep inside the model."""
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged, not numbers, past int64
        raise ValueError(f"token ids must be integers in a list or tensor [T] or [B, T] "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if t.dim() not in (1, 2):
        raise ValueError(f"token ids must have shape [T] or [B, T], got {list(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"empty prompt: no token ids (shape {list(t.shape)})")
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"token ids must be integers, got {t.dtype} (torch would cast them silently)")
    wide = t.to(torch.int64)  # torch compares no uint16/32/64; a uint64 past 2**63 wraps negative and is caught
    bad = ((wide < 0) | (wide >= vocab_size)).nonzero()
    if len(bad):
        at = bad[0].tolist()
        raise ValueError(f"token id {t[tuple(at)].item()} at position {at[0] if len(at) == 1 else at} is outside "
                         f"the vocabulary (0 <= id < {vocab_size})")
    return wide if wide.dim() == 2 else wide[None]


def parse_device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use cpu or cuda[:N]")
    return device


class LLM:
    """A model plus tokenizer plus policy. Each call starts from an empty cache; `cache_stats()` tells
    what the last call's cache held. Prompts and chat messages that are not valid Unicode (lone
    surrogates, i.e. undecodable bytes) are refused with TextError, a ValueError (never replaced); ids
    must be integers with 0 <= id < vocab_size, shaped [T] or [B, T], else ValueError naming the first bad
    id and its position."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, policy: Policy, *, mask: bool = False,
                 prefill_chunk: int | None = None, source: str | Path = "", cuda_graphs: bool = True,
                 weights: str = "dequantize", kv_dtype: str | torch.dtype | None = None):
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.weights = weights  # how the weights are held (engine.load's `weights`)
        self.args: ModelArgs = model.args
        self.mask, self.prefill_chunk, self.cuda_graphs = mask, prefill_chunk, cuda_graphs
        self.source, self.name = Path(source), Path(source).name  # where the weights came from
        self.device = model.tok_embeddings.weight.device
        self.dtype = model.tok_embeddings.weight.dtype
        self.kv_dtype = parse_kv_dtype(kv_dtype) or self.dtype  # of the stores' K and V
        self.store: KVStore | None = None
        if model.rope is None:
            model.rope = Rope(self.args, self.device)

    # ---- cache -----------------------------------------------------------------------------------
    def with_policy(self, policy: Policy) -> "LLM":
        """This LLM with another policy, sharing the model (the same weights in memory) and tokenizer: a store
        sized by it is sized as `load(..., policy=policy)` would size it."""
        view = copy.copy(self)
        view.policy = policy
        return view

    def new_store(self, prompt_len: int, max_new_tokens: int, batch: int = 1) -> KVStore:
        """A store sized for this request; `full` is bounded by the model context."""
        total = prompt_len + max_new_tokens
        if self.policy.name == "full":
            if total > self.args.max_seq_len:
                raise ContextError(
                    f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model context "
                    f"({self.args.max_seq_len}) with policy full; use an eviction policy with a budget, e.g. "
                    f"--policy streaming --budget {min(1024, self.args.max_seq_len // 2)}"
                )
            budget = capacity = total
        else:
            budget = self.policy.resolve_budget(prompt_len)
            capacity = total if self.mask else min(self.policy.slots(budget, max_new_tokens), max(total, 1))
            budget = min(budget, capacity)
        return make_store(self.args, self.policy, budget, max(capacity, 1), batch, self.dtype, self.device,
                          self.model.rope, mask=self.mask, kv_dtype=self.kv_dtype, tp=self.model.tp)

    def decoder(self, store: KVStore) -> Decoder:
        """Decode steps over `store` (engine/decode/ chooses how each one runs)."""
        return Decoder(self.model, store, cuda_graphs=self.cuda_graphs)

    def cache_stats(self) -> CacheStats | None:
        return self.store.stats() if self.store else None

    # ---- text in, text out -----------------------------------------------------------------------
    def _ids(self, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """A prompt as ids [B, T] on the model's device: text encoded (TextError if it is not valid
        Unicode), ids checked by `token_ids` (ValueError naming the first bad one)."""
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        return token_ids(prompt, self.args.vocab_size).to(self.device)

    def session(self, max_new_tokens: int = 4096) -> "Session":
        """A conversation kept in one cache: every turn appends to it (see Session)."""
        return Session(self, max_new_tokens)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
               suppress: Sequence[int] = ()) -> Iterator[str]:
        """Yield text pieces as they are decoded (never a split multi-byte character). Ids in `suppress`
        are never sampled (the EOS ids: a reply of exactly max_new_tokens)."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop), tuple(suppress))
        ids = self._ids(prompt)
        if ids.shape[0] != 1:
            raise ValueError("stream/generate take one prompt; use logits/nll for batches")
        session = Session(self, max_new_tokens, prompt_len=ids.shape[1])
        yield from session.stream(ids[0].tolist(), params)

    def generate(self, prompt: str | Sequence[int], **kw) -> str:
        """The completion of `prompt` as one string (arguments as `stream`)."""
        return "".join(self.stream(prompt, **kw))

    def chat(self, messages: list[dict[str, str]], **kw) -> str:
        """Answer the conversation with the model's chat template applied."""
        return "".join(self.stream(self.tokenizer.apply_chat(messages), **kw))

    # ---- numbers for checks and evaluation -------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """One full causal forward, no cache: [B, T] -> [B, T, V]."""
        ids = self._ids(ids)
        if ids.shape[1] > self.args.max_seq_len:
            raise ContextError(f"{ids.shape[1]} tokens exceed the model context ({self.args.max_seq_len})")
        return self.model(ids)

    @torch.inference_mode()
    def nll(self, ids: torch.Tensor, prefill_len: int | None = None) -> torch.Tensor:
        """NLL [B, T-1] of every next token under the loaded policy. The first `prefill_len` tokens go
        through prefill (exact, then compressed); the rest one decode step each."""
        ids = self._ids(ids)
        B, T = ids.shape
        if prefill_len is not None and (isinstance(prefill_len, bool) or not isinstance(prefill_len, int)
                                        or not 1 <= prefill_len <= T):
            raise ValueError(f"prefill_len must be an int in [1, {T}] (the sequence's length), got {prefill_len!r}")
        n_pre = prefill_len or 1
        self.store = store = self.new_store(n_pre, T - n_pre, batch=B)
        nll = torch.empty(B, T - 1, device=self.device)  # one column per step: memory O(B x T), not O(B x T x V)

        def score(logits: torch.Tensor, start: int) -> None:
            n = min(logits.shape[1], T - 1 - start)
            lp = logits[:, :n].float().log_softmax(-1)
            nll[:, start : start + n] = -lp.gather(-1, ids[:, start + 1 : start + 1 + n, None])[..., 0]

        chunk = self.prefill_chunk or n_pre
        for start in range(0, n_pre, chunk):  # prefill chunk by chunk, scoring each chunk's logits at once
            score(prefill(self.model, store, ids[:, start : min(n_pre, start + chunk)], all_logits=True), start)
        step = self.decoder(store).step
        for t in range(n_pre, T - 1):
            score(step(ids[:, t])[:, None], t)
        return nll


class Session:
    """Tokens fed so far live in one KV store; `stream` appends a turn and the reply to it, so a
    conversation is never re-prefilled. The last sampled token of a reply is fed with the next turn."""

    def __init__(self, llm: LLM, max_new_tokens: int, prompt_len: int | None = None):
        self.llm = llm
        if prompt_len is None:  # an open-ended conversation: room for the whole model context
            max_new_tokens = min(max_new_tokens, llm.args.max_seq_len // 2)
            prompt_len = llm.args.max_seq_len - max_new_tokens
        self.store = llm.store = llm.new_store(max(prompt_len, 1), max_new_tokens)
        self.step = llm.decoder(self.store).step
        self.tokens: list[int] = []  # every token in the cache, in order
        self.pending: list[int] = []  # sampled but not yet fed

    def reset(self) -> None:
        self.store.reset()
        self.tokens, self.pending = [], []

    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Append tokens (after any pending one) to the cache; returns the next-token logits [1, V]."""
        if not self.pending and not len(ids):
            raise ValueError("nothing to feed")
        checked = token_ids(self.pending + list(ids), self.llm.args.vocab_size)
        if checked.shape[0] != 1:
            raise ValueError(f"a session feeds one sequence of ids [T], got shape {list(checked.shape)}")
        ids = checked[0].tolist()
        store = self.store
        if store.policy.name == "full" and store.occupancy + len(ids) > store.capacity:
            raise ContextError(
                f"{store.occupancy} cached + {len(ids)} new tokens exceed the {store.capacity} slots of policy "
                f"{store.policy.name}" + (" (the model context)" if store.policy.name == "full" else "")
                + "; start a new conversation (/reset) or use an evicting policy")
        logits = prefill(self.llm.model, store, torch.tensor([ids], device=self.llm.device), self.llm.prefill_chunk)
        self.tokens += ids
        self.pending = []
        return logits

    def stream_ids(self, ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Feed `ids`, then yield sampled token ids until EOS or max_new_tokens."""
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.llm.device).manual_seed(params.seed)
        vocab = self.llm.args.vocab_size
        if any(i >= vocab for i in params.suppress) or len(set(params.suppress)) == vocab:
            raise ValueError(f"suppress must leave some of the vocabulary's ids 0 <= id < {vocab} to sample, "
                             f"got {len(params.suppress)} ids up to {max(params.suppress)}")
        logits = self.feed(ids)
        eos = set(self.llm.tokenizer.eos_ids)
        for i in range(params.max_new_tokens):
            token = self._sample(logits, params, generator)  # [1], fed back as it is: no new tensor per step
            tid = token.item()
            self.pending = [tid]
            yield tid
            if tid in eos or i + 1 == params.max_new_tokens:
                return
            logits = self.step(token)
            self.tokens.append(tid)
            self.pending = []

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
        """The next token [B]. Under tensor parallelism the group's first rank samples and sends it to the others:
        every rank must feed the same token, whatever its generator."""
        tp = self.llm.model.tp
        if tp is None:
            return sample(logits, params, generator)
        if tp.rank == 0:
            return tp.broadcast(sample(logits, params, generator))
        return tp.broadcast(torch.empty(logits.shape[0], dtype=torch.long, device=logits.device))

    def stream(self, ids: Sequence[int], params: SamplingParams) -> Iterator[str]:
        """Feed `ids` and yield the reply as text pieces, honouring stop strings."""
        tok = self.llm.tokenizer
        decoder, stops = StreamDecoder(tok), StopFilter(tuple(params.stop) + tok.stop_strings)
        eos = set(tok.eos_ids)
        for tid in self.stream_ids(ids, params):
            if tid in eos:
                break
            piece = stops.feed(decoder.push(tid))
            if piece:
                yield piece
            if stops.stopped:
                return
        tail = stops.feed(decoder.flush()) + stops.flush()
        if tail:
            yield tail


def load(model: str | Path = "smollm2-135m-instruct", policy: str | Policy = "full", *, budget: int | float | None = None,
         sinks: int | None = None, recent: int | None = None, device: str = "cpu", dtype: str = "float32",
         weights: str | None = None, mask: bool = False, prefill_chunk: int | None = None,
         template: str | None = None, cuda_graphs: bool = True, kv_dtype: str | None = None,
         tensor_parallel: bool | TensorParallel = True, **policy_params: object) -> LLM:
    """Load a model folder, a .gguf file or a short name from weights/ (the default model is fetched on
    first use), with an eviction policy given by name (plus its parameters) or as an object.

    `weights`: "packed" keeps a .gguf file's quantized blocks and multiplies by them directly (the default
    for a .gguf file and for the default model, which ships as one; "packed-q8act" makes a decode step's
    products as llama.cpp does, activations quantized to 8 bits, ~1.7x faster on Q4 blocks and no longer
    the dequantized model's numbers); "dequantize" unpacks them to `dtype`
    (a folder's default); "q8_0" / "q4_0" quantize a checkpoint's matrices at load. The KV cache holds K and
    V in `kv_dtype` ("bf16", "fp16" or "fp32"; None: the model's `dtype`).

    `tensor_parallel`: in a process group of several ranks (started by torchrun; joined here if not yet),
    True splits the model over all of them, each rank reading only its part of the weights (engine.dist);
    a TensorParallel splits it over that group; False loads it whole on every rank."""
    from .fetch import resolve_model
    from .tokenizer import load_tokenizer, tokenizer_from_gguf
    from .weights import load_checkpoint, open_gguf

    torch_dtype, torch_device, torch_kv_dtype = parse_dtype(dtype), parse_device(device), parse_kv_dtype(kv_dtype)
    if isinstance(policy, str):
        policy = make_policy(policy, budget=budget, sinks=sinks, recent=recent, **policy_params)
    elif budget is not None or sinks is not None or recent is not None or policy_params:
        raise PolicyError("pass budget/sinks/recent inside the policy object, not beside it")
    path = resolve_model(str(model), packed=weights in (None, *PACKED_MODES))
    mode = weights or ("packed" if path.is_file() else "dequantize")
    if mode != "dequantize" and torch_device.type == "cpu" and torch_dtype != torch.float32:
        raise WeightsError(f"--weights {mode} computes in float32 on the CPU (its kernels' activations); "
                           f"drop --dtype {dtype}, or load with --weights dequantize")
    tp = tensor_parallel_group(tensor_parallel, torch_device)
    reader = open_gguf(path) if path.is_file() and path.suffix == ".gguf" else None  # weights and tokenizer
    args, state, fmt = load_checkpoint(path, dtype=torch_dtype, weights=mode, reader=reader,
                                       shard=tp.shard if tp else None)
    if tp is not None:
        tp.check_same("the model and how it is loaded", (path.name, args.to_dict(), mode, str(torch_dtype)))
    net = Transformer.from_state_dict(args, state, torch_device, tp)
    del state
    tok = tokenizer_from_gguf(reader) if reader else load_tokenizer(path, template=template)
    return LLM(net, tok, policy, mask=mask, prefill_chunk=prefill_chunk, source=path, cuda_graphs=cuda_graphs,
               weights=mode, kv_dtype=torch_kv_dtype)


def tensor_parallel_group(spec: bool | TensorParallel, device: torch.device) -> TensorParallel | None:
    """load's `tensor_parallel` as the group to split over, or None: one process, or not asked to split."""
    if isinstance(spec, TensorParallel):
        return spec if spec.size > 1 else None
    if not isinstance(spec, bool):
        raise ValueError(f"tensor_parallel must be True, False or an engine.dist.TensorParallel, got {spec!r}")
    return TensorParallel() if spec and init_from_env(device) else None
