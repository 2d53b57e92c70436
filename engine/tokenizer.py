"""Text <-> ids: one `Tokenizer` over sentencepiece (`tokenizer.model`) and HF `tokenizers`
(`tokenizer.json`), plus the chat templates we support (chatml, llama-2, vicuna v1.1).

Control tokens (BOS, EOS, <|im_start|> ...) only ever enter a sequence as ids placed by the code;
text, including a user's "</s>" or "<|im_end|>", is always encoded as plain text.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from collections.abc import Container
from typing import TYPE_CHECKING, Any, Callable

import sentencepiece
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from .config import Range, Source, describe, gguf_source, read_json

if TYPE_CHECKING:
    import gguf

TEMPLATES = ("chatml", "llama-2", "vicuna")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_ROLES = ("system", "user", "assistant")
# sentencepiece's piece types, which GGUF's tokenizer.ggml.token_type reuses.
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6


class TokenizerError(ValueError):
    """A tokenizer file, its configuration, a template name or a chat is missing or malformed."""


class TextError(ValueError):
    """Text that is not valid Unicode: a lone surrogate, which is how Python hands over bytes that a
    terminal, a command line or a file could not decode (see `check_text`)."""


def check_text(text: str, where: str) -> str:
    """`text` unchanged if it is valid Unicode, else TextError naming `where` and the first bad character.

    Every way text enters (prompts, chat messages, --prompt/--system, terminal lines, transcripts) comes
    through here, so undecodable bytes are refused the same way everywhere and never guessed at: the
    tokenizers would raise an opaque TypeError, and replacing them would send the model text nobody wrote.
    """
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        escaped = 0xDC80 <= code <= 0xDCFF  # Python's surrogateescape of an undecodable byte
        what = f"byte {code - 0xDC00:#04x} that is not UTF-8" if escaped else f"lone surrogate U+{code:04X}"
        raise TextError(f"{where} is not valid Unicode: {what} at character {e.start}") from None
    return text


# ----------------------------------------------------------------------------- backends

class _SpmBackend:
    """sentencepiece: control pieces never match text and are skipped on decode by the library itself."""

    def __init__(self, proto: bytes) -> None:
        self.sp = sentencepiece.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(proto)
        self.vocab_size = self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)

    def token_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)
        return i if self.sp.IdToPiece(i) == token else None

    def token(self, i: int) -> str:
        return self.sp.IdToPiece(i)

    def special_id(self, name: str) -> int | None:
        i = {"bos": self.sp.bos_id, "eos": self.sp.eos_id}[name]()
        return i if i >= 0 else None


class _HfBackend:
    """HF tokenizers with `encode_special_tokens`, so added special tokens are not split off user text."""

    def __init__(self, spec: str) -> None:
        self.tk = tokenizers.Tokenizer.from_str(spec)
        self.tk.encode_special_tokens = True
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def token(self, i: int) -> str:
        return self.tk.id_to_token(i)

    def special_id(self, name: str) -> int | None:
        return None


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Encode/decode plus one chat template. Build it with `load_tokenizer` or `tokenizer_from_gguf`."""

    def __init__(self, backend: _SpmBackend | _HfBackend, config: dict[str, Any], template: str | None,
                 extra_eos: tuple[int, ...] = ()) -> None:
        self._backend = backend
        self.vocab_size = backend.vocab_size
        self.bos_id = self._config_id(config, "bos_token", backend.special_id("bos"))
        eos = self._config_id(config, "eos_token", backend.special_id("eos"))
        self.add_bos = bool(config.get("add_bos_token", isinstance(backend, _SpmBackend)))
        chat_template = config.get("chat_template") or ""
        self.template = template or _detect_template(chat_template) or (
            "chatml" if backend.token_id("<|im_start|>") is not None else "llama-2")
        if self.template not in TEMPLATES:
            raise TokenizerError(f"unknown chat template {self.template!r} (known: {', '.join(TEMPLATES)})")
        self._im = (backend.token_id("<|im_start|>"), backend.token_id("<|im_end|>"))
        if self.template == "chatml":
            if None in self._im:
                raise TokenizerError("template chatml needs <|im_start|> and <|im_end|> in the vocabulary")
            extra_eos = (*extra_eos, self._im[1])
        elif self.bos_id is None or eos is None:
            raise TokenizerError(f"template {self.template} needs BOS and EOS tokens")
        self.eos_ids = tuple(dict.fromkeys(i for i in (eos, *extra_eos) if i is not None))
        if not self.eos_ids:
            raise TokenizerError("the tokenizer names no EOS token (eos_token in tokenizer_config.json)")
        self._eos = self.eos_ids[0]
        self.default_system = {"chatml": _chatml_default_system(chat_template), "vicuna": VICUNA_SYSTEM}.get(
            self.template)
        self.stop_strings: tuple[str, ...] = ("USER:",) if self.template == "vicuna" else ()

    def _config_id(self, config: dict[str, Any], key: str, default: int | None) -> int | None:
        token = config.get(key)
        if not token:
            return default
        i = self._backend.token_id(token)
        if i is None:
            raise TokenizerError(f"tokenizer config names {key} {token!r}, which is not in the vocabulary")
        return i

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Plain text to ids; special-token spellings in `text` stay text. BOS only when asked. Text that
        is not valid Unicode is refused (TextError, see `check_text`)."""
        if bos and self.bos_id is None:
            raise TokenizerError("this tokenizer has no BOS token")
        return [self.bos_id] * bos + self._backend.encode(check_text(text, "the text"))

    def decode(self, ids: list[int]) -> str:
        """Ids to text, skipping control tokens."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return self._backend.decode(list(ids))

    def apply_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The chat as ids: template control tokens as ids, every piece of text through `encode`. A message
        that is not valid Unicode is refused (TextError naming the message, see `check_text`)."""
        return [i for seg in self._segments(messages, add_generation_prompt)
                for i in ([seg] if isinstance(seg, int) else self._backend.encode(seg))]

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as text with control tokens spelled out: for transcripts and checking templates."""
        segs = self._segments(messages, add_generation_prompt)
        return "".join(self._backend.token(s) if isinstance(s, int) else s for s in segs)

    def _segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[str | int]:
        _check_messages(messages, alternate=self.template != "chatml")
        return _TEMPLATE_FNS[self.template](self, messages, add_generation_prompt)


def _check_messages(messages: list[dict[str, str]], alternate: bool) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(f"a chat needs at least one message, in a list (got {type(messages).__name__})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise TokenizerError(f"message {i} must be {{'role': system|user|assistant, 'content': str}}, "
                                 f"got {m!r:.100}")
        if m["role"] == "system" and i:
            raise TokenizerError(f"message {i}: a system message may only come first")
        check_text(m["content"], f"message {i}")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if alternate and turns != [("user", "assistant")[i % 2] for i in range(len(turns))]:
        raise TokenizerError(f"roles must alternate user/assistant starting with user, got {turns}")


def _chatml(tok: Tokenizer, messages: list[dict[str, str]], gen: bool) -> list[str | int]:
    """SmolLM2/Qwen chatml: `<|im_start|>{role}\\n{content}<|im_end|>\\n`, no BOS, content not stripped."""
    if messages[0]["role"] != "system" and tok.default_system is not None:
        messages = [{"role": "system", "content": tok.default_system}, *messages]
    start, end = tok._im
    segs: list[str | int] = []
    for m in messages:
        segs += [start, f"{m['role']}\n{m['content']}", end, "\n"]
    return segs + [start, "assistant\n"] * gen


def _llama2(tok: Tokenizer, messages: list[dict[str, str]], gen: bool) -> list[str | int]:
    """Meta's `chat_completion`: the system prompt joins the first user turn; each exchange is its own
    BOS ... EOS segment; contents are stripped."""
    if messages[0]["role"] == "system":
        if len(messages) == 1:
            raise TokenizerError("llama-2: a system message must be followed by a user message")
        first = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
        messages = [{"role": "user", "content": first}, *messages[2:]]
    if gen and messages[-1]["role"] != "user":
        raise TokenizerError("llama-2: the chat must end with a user message to generate a reply")
    segs: list[str | int] = []
    for i in range(0, len(messages), 2):
        user = messages[i]["content"].strip()
        if i + 1 < len(messages):
            segs += [tok.bos_id, f"[INST] {user} [/INST] {messages[i + 1]['content'].strip()} ", tok._eos]
        else:
            segs += [tok.bos_id, f"[INST] {user} [/INST]"]
    return segs


def _vicuna(tok: Tokenizer, messages: list[dict[str, str]], gen: bool) -> list[str | int]:
    """FastChat vicuna_v1.1 (ADD_COLON_TWO, sep " ", sep2 "</s>" as the EOS id)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else tok.default_system
    segs: list[str | int] = [tok.bos_id]
    text = f"{system} "
    for m in messages:
        if m["role"] == "user":
            text += f"USER: {m['content']} "
        elif m["role"] == "assistant":
            segs += [f"{text}ASSISTANT: {m['content']}", tok._eos]
            text = ""
    text += "ASSISTANT:" * gen
    return segs + [text] * bool(text)


_TEMPLATE_FNS: dict[str, Callable[[Tokenizer, list[dict[str, str]], bool], list[str | int]]] = {
    "chatml": _chatml, "llama-2": _llama2, "vicuna": _vicuna}


def _detect_template(chat_template: str) -> str | None:
    markers = (("<|im_start|>", "chatml"), ("[INST]", "llama-2"), ("USER:", "vicuna"), ("ASSISTANT:", "vicuna"))
    return next((name for marker, name in markers if marker in chat_template), None)


def _chatml_default_system(chat_template: str) -> str | None:
    """The literal system message a chatml Jinja template inserts when the chat has none (SmolLM2's)."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}+]+?)<\|im_end\|>", chat_template)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- streaming

class StreamDecoder:
    """Incremental detokenizer. It re-decodes a short window (the last emitted group plus pending ids) and
    emits the new suffix, holding text back while it ends in an incomplete UTF-8 sequence (U+FFFD), so a
    multi-byte character is never split and the pieces concatenate to `decode(all ids)`. Keeping the last
    emitted group as context keeps spacing right for sentencepiece, which drops a leading space at the
    start of a decode."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self._window: list[int] = []
        self._done = 0  # ids of the window whose text was already emitted

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._tok.decode(self._window)
        if text.endswith("\ufffd") and not final:
            return ""
        new = text[len(self._tok.decode(self._window[: self._done])):]
        self._window = self._window[self._done:]
        self._done = len(self._window)
        return new


# ----------------------------------------------------------------------------- loading

def load_tokenizer(folder: str | Path, template: str | None = None) -> Tokenizer:
    """From a model folder: tokenizer.model (preferred: sentencepiece is the reference where it ships)
    or tokenizer.json, plus tokenizer_config.json / chat_template.jinja / generation_config.json."""
    folder = Path(folder)
    spm, hf = folder / "tokenizer.model", folder / "tokenizer.json"
    if spm.is_file():
        backend: _SpmBackend | _HfBackend = _backend(_SpmBackend, spm.read_bytes(), spm)
    elif hf.is_file():
        text = _read_text(hf)
        _check_bpe(Source(read_json(hf, TokenizerError, text), str(hf), TokenizerError))
        backend = _backend(_HfBackend, text, hf)
    else:
        raise TokenizerError(f"no tokenizer.model or tokenizer.json in {folder}")
    config = _tokenizer_config(_json_source(folder / "tokenizer_config.json"))
    jinja = folder / "chat_template.jinja"
    if not config["chat_template"] and jinja.is_file():
        config["chat_template"] = _read_text(jinja)
    extra_eos = _json_source(folder / "generation_config.json").ids("eos_token_id", ())
    return Tokenizer(backend, config, template, extra_eos)


def _backend(cls: type, data: Any, path: Path) -> _SpmBackend | _HfBackend:
    try:
        return cls(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # bare Exception/RuntimeError on bad files; a Rust panic is a BaseException
        raise TokenizerError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_source(path: Path) -> Source:
    """A JSON file beside the tokenizer (absent: empty) for typed, checked reads."""
    return Source(read_json(path, TokenizerError) if path.is_file() else {}, str(path), TokenizerError)


def _tokenizer_config(src: Source) -> dict[str, Any]:
    """The tokenizer_config.json fields we use, checked: special tokens as strings (HF's {"content": ...}
    form unwrapped), add_bos_token a bool (absent: the backend's default), chat_template one string (from
    a list of named templates, the one named "default")."""
    config: dict[str, Any] = {key: _token_text(src, key) for key in ("bos_token", "eos_token")}
    if src.data.get("add_bos_token") is not None:
        config["add_bos_token"] = src.flag("add_bos_token", False)
    value = src.data.get("chat_template")
    if isinstance(value, list):
        entries = [Source(t, src.where, TokenizerError, f"chat_template[{i}].") for i, t in enumerate(value)]
        config["chat_template"] = {e.text("name", ""): e.text("template", "") for e in entries}.get("default", "")
    else:
        config["chat_template"] = src.text("chat_template", "")
    return config


def _check_bpe(spec: Source) -> None:
    """tokenizer.json's BPE merges, checked before the library reads them (see `_check_merges`)."""
    model = spec.section("model")
    if model.data.get("type") != "BPE":
        return
    vocab = model.data.get("vocab")
    if not isinstance(vocab, dict):
        raise model.fail("vocab", "an object of token -> id", vocab)
    _check_merges(model, "merges", model.array("merges", object, []), vocab,
                  model.text("continuing_subword_prefix", ""))


def _check_merges(src: Source, key: str, merges: list, vocab: Container[str], prefix: str = "") -> None:
    """Each merge ("a b" or ["a", "b"]) two tokens of `vocab` whose join is one too: on any other merge
    the tokenizers library panics (a Rust abort message on stderr) instead of raising."""
    for i, m in enumerate(merges):
        pair = m.split(" ", 1) if isinstance(m, str) else m
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        if ok:
            left, right = pair
            joined = left + (right[len(prefix):] if prefix and right.startswith(prefix) else right)
            ok = left in vocab and right in vocab and joined in vocab
        if not ok:
            raise src.fail(f"{key}[{i}]", "two tokens of the vocabulary whose join is one too", m)


def _token_text(src: Source, key: str) -> str | None:
    value = src.data.get(key)
    content = value.get("content") if isinstance(value, dict) else value
    if content is not None and not isinstance(content, str):
        raise src.fail(key, 'a string or {"content": string}', value)
    return content or None


# ----------------------------------------------------------------------------- GGUF

def tokenizer_from_gguf(reader: "gguf.GGUFReader", template: str | None = None) -> Tokenizer:
    """The tokenizer stored in a GGUF model file's metadata."""
    name, data, config = _gguf_tokenizer(reader)
    backend = _backend(_SpmBackend if name == "tokenizer.model" else _HfBackend, data, Path(reader.data.filename))
    return Tokenizer(backend, config, template)


def export_gguf_tokenizer(reader: "gguf.GGUFReader", out_dir: Path) -> None:
    """Write a GGUF's tokenizer as tokenizer.model (llama/spm) or tokenizer.json (gpt2/BPE) plus
    tokenizer_config.json, so the converted folder loads with `load_tokenizer`."""
    name, data, config = _gguf_tokenizer(reader)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        (out_dir / name).write_bytes(data)
    else:
        (out_dir / name).write_text(data, encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")


def _gguf_tokenizer(reader: "gguf.GGUFReader") -> tuple[str, bytes | str, dict[str, Any]]:
    """(file name, file content, tokenizer_config) rebuilt from GGUF metadata, every field's type checked."""
    src = gguf_source(reader, TokenizerError)
    if "tokenizer.ggml.model" not in src.data:
        raise TokenizerError(f"{src.where}: the GGUF file has no tokenizer (no tokenizer.ggml.model)")
    kind = src.text("tokenizer.ggml.model")
    tokens = src.array("tokenizer.ggml.tokens", str)
    types = src.array("tokenizer.ggml.token_type", Range(1, 6), length=len(tokens))  # sentencepiece's piece types
    token_id = Range(0, len(tokens) - 1, optional=True)
    ids = {k: src.number(f"tokenizer.ggml.{k}_token_id", token_id, None) for k in ("unknown", "bos", "eos")}
    # tokenizer_class tells transformers how to read the files (it guesses wrong for a bare tokenizer.model).
    config: dict[str, Any] = {"tokenizer_class": "LlamaTokenizer" if kind == "llama" else "PreTrainedTokenizerFast"}
    config.update({f"{k}_token": tokens[ids[k]] for k in ("bos", "eos") if ids[k] is not None})
    config["add_bos_token"] = src.flag("tokenizer.ggml.add_bos_token", kind == "llama")
    if src.text("tokenizer.chat_template", ""):
        config["chat_template"] = src.text("tokenizer.chat_template")
    if kind == "llama":
        scores = src.array("tokenizer.ggml.scores", Range(-math.inf, math.inf, integer=False), length=len(tokens))
        proto = _spm_proto(tokens, scores, types, ids, src.flag("tokenizer.ggml.add_space_prefix", True))
        return "tokenizer.model", proto, config
    if kind == "gpt2":
        merges = src.array("tokenizer.ggml.merges", str)
        _check_merges(src, "tokenizer.ggml.merges", merges, set(tokens))
        return "tokenizer.json", _bpe_json(tokens, types, merges, src.text("tokenizer.ggml.pre", "default")), config
    raise TokenizerError(f"{src.where}: unsupported GGUF tokenizer model {describe(kind)} (supported: llama, gpt2)")


def _spm_proto(tokens: list[str], scores: list[float], types: list[int], ids: dict[str, int | None],
               add_space_prefix: bool) -> bytes:
    """A sentencepiece BPE ModelProto with byte fallback and an identity normalizer, as llama.cpp reads it."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise TokenizerError("rebuilding a sentencepiece model from GGUF needs protobuf: pip install protobuf") from e
    m = pb.ModelProto()
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = _BYTE in types
    for key, name in (("unknown", "unk"), ("bos", "bos"), ("eos", "eos")):
        i = ids[key]
        setattr(spec, f"{name}_id", -1 if i is None else i)
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[i])
    spec.pad_id = -1
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_space_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        m.pieces.add(piece=token, score=score, type=kind)
    return m.SerializeToString()


def _bpe_json(tokens: list[str], types: list[int], merges: list[str], pre: str) -> str:
    """A byte-level BPE tokenizer.json; control tokens become added special tokens (skipped on decode),
    user-defined ones plain added tokens."""
    splits = {
        "smollm": [pre_tokenizers.Digits(individual_digits=True),
                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    }
    if pre not in splits:
        raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(splits)})")
    tk = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                         merges=[tuple(m.split(" ", 1)) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.Sequence(splits[pre])
    tk.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL])
    tk.add_tokens([AddedToken(t, normalized=False) for t, k in typed if k == _USER_DEFINED])
    return tk.to_str()
