"""Hostile model metadata (issue 17, class 1): config.json, params.json, the safetensors index,
tokenizer_config.json / generation_config.json / tokenizer.json and GGUF metadata.

Every case ends in a load that succeeded or in a documented error (ConfigError, WeightsError,
TokenizerError: ValueErrors, which the CLIs print as one line), within a time limit and without a large
allocation: never another exception, a traceback or a hang. A hypothesis suite per kind of input, then
one regression test per example the issue names, then the worst cases through the real CLI."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as HfTokenizer

from engine.config import ConfigError, ModelArgs
from engine.tokenizer import Tokenizer, TokenizerError, load_tokenizer, tokenizer_from_gguf
from engine.weights import (
    GGUF_NAMES, HF_NAMES, WeightsError, expand_names, expected_shapes, hf_config, load_checkpoint, save_hf_folder,
)

from .helpers import random_state, tiny_args
from .test_generate import assert_user_error, run_chat
from .test_weights import META_PARAMS, write_meta

DOCUMENTED = (ConfigError, WeightsError, TokenizerError)
ARGS = tiny_args()
HF_BASE = hf_config(ARGS)
VT = gguf.GGUFValueType
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, database=None)  # more: deeper


# ---- every case: a result or one documented line, in bounded time and memory ----------------------

@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail a case that runs past `seconds` (a loop over 2^31 layer names) instead of hanging the suite."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def outcome(load: Callable[[], Any]) -> Any:
    """`load()`'s result, or the documented error it raised, whose message must be one short printable
    line. Any other exception, a case over 10 s or a new memory peak 1 GiB above the last fails the test."""
    before = peak_rss()
    with time_limit(10):
        try:
            result = load()
        except DOCUMENTED as e:
            result = e
    assert peak_rss() - before < 1 << 30, "one load raised the peak memory by over 1 GiB"
    if isinstance(result, DOCUMENTED):
        message = str(result)
        assert message and message.isprintable() and len(message) < 500, repr(message)
    return result


def expect(load: Callable[[], Any], kind: type[ValueError], *needles: str) -> None:
    result = outcome(load)
    assert isinstance(result, kind), f"expected {kind.__name__}, got {result!r:.200}"
    assert all(n in str(result) for n in needles), (str(result), needles)


def assert_consistent(loaded: tuple[ModelArgs, dict[str, torch.Tensor], str]) -> None:
    """A load that succeeds gives exactly the tensors its args imply."""
    args, state, _ = loaded
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(args)


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value))


@contextlib.contextmanager
def copy_of(folder: Path) -> Iterator[Path]:
    """A fresh copy of a model folder for one case, inside a scratch folder that can hold files outside it."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(shutil.copytree(folder, Path(tmp) / folder.name))


# ---- strategies ----------------------------------------------------------------------------------

EDGES = st.sampled_from([0, -1, 1, 2, 3, 4, 96, 128, 256, 2**31, 2**40, 2**63, -2**63, 10**30, 0.0, 2.5, -1.5,
                         1e-300, 1e300, math.nan, math.inf, -math.inf, True, False, None, "", "2", "linear"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | EDGES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)
ROPE = st.dictionaries(
    st.sampled_from(["type", "rope_type", "factor", "original_max_position_embeddings", "low_freq_factor",
                     "high_freq_factor", "rope_theta"]),
    st.sampled_from(["linear", "dynamic", "llama3", "yarn", "default", "none", 0.5, 1, 4.0]) | JSON,
    max_size=4,
)
VALUES = st.one_of(EDGES, JSON, ROPE)
HF_KEYS = sorted({*HF_BASE, "rope_parameters"})
META_KEYS = sorted({*META_PARAMS, "ffn_dim_multiplier", "rope_theta", "max_seq_len", "n_kv_heads"})
NOT_OBJECTS = JSON.filter(lambda v: not isinstance(v, dict)).map(json.dumps).map(str.encode) | st.binary(max_size=30)


def edited(base: dict[str, Any], edits: dict[str, Any], drop: set[str]) -> dict[str, Any]:
    return {k: v for k, v in {**base, **edits}.items() if k not in drop}


def load_edited(folder: Path, name: str, content: object) -> None:
    """Load a copy of `folder` whose file `name` holds `content`: consistent tensors or a documented error."""
    with copy_of(folder) as copy:
        write_json(copy / name, content)
        result = outcome(lambda: load_checkpoint(copy))
    if not isinstance(result, DOCUMENTED):
        assert_consistent(result)


# ---- config.json and params.json -----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_folder(ARGS, random_state(ARGS), tmp_path_factory.mktemp("hf") / "m")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_folder(ARGS, random_state(ARGS), tmp_path_factory.mktemp("sharded") / "m", max_shard_bytes=60_000)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("meta") / "m"
    args = ModelArgs.from_meta_params(META_PARAMS, vocab_size=128)
    write_meta(folder, args, random_state(args), n_shards=2)
    return folder


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(HF_KEYS), VALUES, min_size=1, max_size=3),
       drop=st.sets(st.sampled_from(HF_KEYS), max_size=2))
def test_fuzz_config_json(hf_dir: Path, edits: dict[str, Any], drop: set[str]) -> None:
    load_edited(hf_dir, "config.json", edited(HF_BASE, edits, drop))


@FUZZ
@given(content=NOT_OBJECTS)
def test_fuzz_config_json_that_is_no_object(hf_dir: Path, content: bytes) -> None:
    with copy_of(hf_dir) as folder:
        (folder / "config.json").write_bytes(content)
        assert isinstance(outcome(lambda: load_checkpoint(folder)), ConfigError)


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(META_KEYS), VALUES, min_size=1, max_size=3),
       drop=st.sets(st.sampled_from(META_KEYS), max_size=1))
def test_fuzz_params_json(meta_dir: Path, edits: dict[str, Any], drop: set[str]) -> None:
    load_edited(meta_dir, "params.json", edited(META_PARAMS, edits, drop))


def test_config_json_that_is_a_list(hf_dir: Path) -> None:
    with copy_of(hf_dir) as folder:
        write_json(folder / "config.json", [HF_BASE])
        expect(lambda: load_checkpoint(folder), ConfigError, "config.json: expected a JSON object, found a list")


@pytest.mark.parametrize("key, value", [
    ("num_hidden_layers", 2.0), ("hidden_size", None), ("vocab_size", "128"), ("num_key_value_heads", 2.5),
    ("max_position_embeddings", True), ("bos_token_id", 1.0), ("eos_token_id", [2, "3"]),
])
def test_floats_null_bools_strings_where_integers_belong(hf_dir: Path, key: str, value: object) -> None:
    with copy_of(hf_dir) as folder:
        write_json(folder / "config.json", {**HF_BASE, key: value})
        expect(lambda: load_checkpoint(folder), ConfigError, "config.json", key, "must be")


@pytest.mark.parametrize("key, value", [
    ("rope_scaling", "linear"), ("rope_parameters", "x"), ("rope_scaling", {"type": "linear", "factor": "4"}),
    ("rope_theta", "1e4"), ("rms_norm_eps", "1e-5"), ("tie_word_embeddings", "false"),
])
def test_strings_where_objects_or_numbers_belong(hf_dir: Path, key: str, value: object) -> None:
    with copy_of(hf_dir) as folder:
        write_json(folder / "config.json", {**HF_BASE, key: value})
        expect(lambda: load_checkpoint(folder), ConfigError, "config.json", key, "must be")


@pytest.mark.parametrize("edits, needle", [
    ({"num_hidden_layers": 2**31}, "num_hidden_layers must be an integer in [1, 1024]"),
    ({"max_position_embeddings": 2**40}, "max_position_embeddings must be an integer in [1, 2097152]"),
    ({"vocab_size": 2**40}, "vocab_size must be"),
    ({"head_dim": 1024, "max_position_embeddings": 2**21}, "exceeds 268435456 (the RoPE tables"),
])
def test_absurd_context_layer_count_or_sizes(hf_dir: Path, edits: dict[str, int], needle: str) -> None:
    with copy_of(hf_dir) as folder:
        write_json(folder / "config.json", {**HF_BASE, **edits})
        expect(lambda: load_checkpoint(folder), ConfigError, needle)


@pytest.mark.parametrize("key, value", [("max_position_embeddings", -1), ("max_position_embeddings", 0),
                                        ("rms_norm_eps", math.nan), ("rope_theta", math.inf), ("rope_theta", -1.0)])
def test_negative_context_and_nan_or_inf_floats(hf_dir: Path, key: str, value: float) -> None:
    with copy_of(hf_dir) as folder:
        write_json(folder / "config.json", {**HF_BASE, key: value})
        expect(lambda: load_checkpoint(folder), ConfigError, f"{key} must be")


def test_deeply_nested_config_json(hf_dir: Path) -> None:
    with copy_of(hf_dir) as folder:
        (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        expect(lambda: load_checkpoint(folder), ConfigError, "config.json: not valid JSON")


def test_declared_layer_count_against_the_weights(hf_dir: Path) -> None:
    with copy_of(hf_dir) as folder:
        write_json(folder / "config.json", {**HF_BASE, "num_hidden_layers": 3})
        expect(lambda: load_checkpoint(folder), WeightsError, "the config declares 3 layers but the weights hold 2")


@pytest.mark.parametrize("edits, needle", [
    ({"multiple_of": 0}, "multiple_of must be an integer in [1, 65536], found 0"),
    ({"n_layers": "2"}, "n_layers must be"),
    ({"max_seq_len": -5}, "max_seq_len must be"),
    ({"ffn_dim_multiplier": math.nan}, "ffn_dim_multiplier must be"),
])
def test_params_json_of_wrong_types(meta_dir: Path, edits: dict[str, Any], needle: str) -> None:
    with copy_of(meta_dir) as folder:
        write_json(folder / "params.json", {**META_PARAMS, **edits})
        expect(lambda: load_checkpoint(folder), ConfigError, "params.json", needle)


def test_model_args_built_directly_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"n_layers must be an integer in \[1, 1024\], found 2147483648"):
        ModelArgs(n_layers=2**31)
    with pytest.raises(ConfigError, match=r"head_dim must be even and an integer in \[4, 1024\], found 15"):
        tiny_args(head_dim=15)


# ---- the safetensors index -----------------------------------------------------------------------

SHARD = "model-00001-of-00006.safetensors"  # the first of sharded_dir's files
OUTSIDE_NAMES = st.sampled_from([
    "../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd", "", ".", "..", "nul\x00.safetensors",
    "..\\outside.safetensors", "link.safetensors", f"./{SHARD}", SHARD, "missing.safetensors",
])


def with_outside_shard(folder: Path) -> Path:
    """A copy of the first shard beside the folder and a symlink to it inside: the index may name the link
    (the folder's owner made it, as a Hugging Face hub snapshot does), never the file beside the folder."""
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / SHARD, outside)
    (folder / "link.safetensors").symlink_to(outside)
    return outside


@FUZZ
@given(redirect=st.dictionaries(st.sampled_from([*sorted(expand_names(HF_NAMES, ARGS).values()), "extra.weight"]),
                                OUTSIDE_NAMES | JSON, max_size=3),
       whole=st.none() | JSON | st.builds(lambda wm: {"weight_map": wm}, JSON))
def test_fuzz_safetensors_index(sharded_dir: Path, redirect: dict[str, Any], whole: object) -> None:
    with copy_of(sharded_dir) as folder:
        with_outside_shard(folder)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"] |= redirect
        write_json(folder / "model.safetensors.index.json", index if whole is None else whole)
        result = outcome(lambda: load_checkpoint(folder))
        if not isinstance(result, DOCUMENTED):
            assert_consistent(result)
            files = set(index["weight_map"].values())  # names inside the folder (a symlink there is followed)
            assert all(not Path(f).is_absolute() and ".." not in Path(f).parts for f in files), files


@pytest.mark.parametrize("name, needle", [
    ("../outside.safetensors", "contains '..'"),
    ("ABSOLUTE", "is absolute"),
])
def test_index_naming_a_file_outside_the_folder(sharded_dir: Path, name: str, needle: str) -> None:
    with copy_of(sharded_dir) as folder:
        outside = with_outside_shard(folder)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        file = str(outside) if name == "ABSOLUTE" else name
        index["weight_map"] = {k: file if v == SHARD else v for k, v in index["weight_map"].items()}
        write_json(folder / "model.safetensors.index.json", index)
        expect(lambda: load_checkpoint(folder), WeightsError, "model.safetensors.index.json", needle)


def test_index_may_name_a_symlink_the_folder_holds(sharded_dir: Path) -> None:
    """A Hugging Face hub snapshot: every shard a symlink to a blob outside the folder. It loads."""
    with copy_of(sharded_dir) as folder:
        want = load_checkpoint(folder)[1]
        with_outside_shard(folder)
        (folder / SHARD).unlink()
        (folder / SHARD).symlink_to(folder / "link.safetensors")
        got = load_checkpoint(folder)[1]
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("index, needle", [
    ([], "expected a JSON object, found a list"),
    ({"weight_map": ["a"]}, "weight_map must be an object of tensor name -> file name, found a list"),
    ({"weight_map": {"model.norm.weight": 5}}, "weight_map['model.norm.weight'] must be a file name, found 5"),
    ({"metadata": {}}, "weight_map must be an object"),
])
def test_index_of_wrong_shape(sharded_dir: Path, index: object, needle: str) -> None:
    with copy_of(sharded_dir) as folder:
        write_json(folder / "model.safetensors.index.json", index)
        expect(lambda: load_checkpoint(folder), WeightsError, needle)


# ---- tokenizer_config.json, generation_config.json, tokenizer.json -------------------------------

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": False,
                    "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"}
TOKENIZER_VALUES = VALUES | st.sampled_from([
    *SPECIALS, "nope", {"content": "</s>"}, {"content": 5}, [{"name": "default", "template": "[INST]"}],
    [{"name": 1}], ["x"], "USER: {{ x }}", [1, 2], [2, None],
])


def tiny_tokenizer_json(merges: list[tuple[str, str]] = [("a", "b")]) -> str:
    tk = HfTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=merges))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tk.to_str()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "t"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json())
    write_json(folder / "tokenizer_config.json", TOKENIZER_CONFIG)
    write_json(folder / "generation_config.json", {"eos_token_id": [4, 6]})
    return folder


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(sorted(TOKENIZER_CONFIG)), TOKENIZER_VALUES, max_size=3),
       eos=TOKENIZER_VALUES, whole=st.none() | NOT_OBJECTS)
def test_fuzz_tokenizer_config(tok_dir: Path, edits: dict[str, Any], eos: object, whole: bytes | None) -> None:
    with copy_of(tok_dir) as folder:
        write_json(folder / "tokenizer_config.json", {**TOKENIZER_CONFIG, **edits})
        write_json(folder / "generation_config.json", {"eos_token_id": eos})
        if whole is not None:
            (folder / "tokenizer_config.json").write_bytes(whole)
        result = outcome(lambda: load_tokenizer(folder))
    if not isinstance(result, DOCUMENTED):
        assert isinstance(result.template, str) and all(isinstance(i, int) for i in result.eos_ids)


@pytest.mark.parametrize("file, edits, needle", [
    ("tokenizer_config.json", {"chat_template": 5}, "chat_template must be a string, found 5"),
    ("tokenizer_config.json", {"chat_template": ["x"]}, "chat_template[0] must be an object, found 'x'"),
    ("tokenizer_config.json", {"chat_template": [{"name": "default", "template": 5}]},
     "chat_template[0].template must be a string"),
    ("tokenizer_config.json", {"eos_token": ["</s>"]}, 'eos_token must be a string or {"content": string}'),
    ("tokenizer_config.json", {"bos_token": {"content": 5}}, "bos_token must be a string"),
    ("tokenizer_config.json", {"add_bos_token": "no"}, "add_bos_token must be true or false, found 'no'"),
    ("generation_config.json", {"eos_token_id": ["x"]}, "eos_token_id must be a token id or a list of them"),
])
def test_tokenizer_config_of_odd_shapes(tok_dir: Path, file: str, edits: dict[str, Any], needle: str) -> None:
    with copy_of(tok_dir) as folder:
        write_json(folder / file, {**json.loads((folder / file).read_text()), **edits})
        expect(lambda: load_tokenizer(folder), TokenizerError, file, needle)


def test_tokenizer_config_that_is_a_list(tok_dir: Path) -> None:
    with copy_of(tok_dir) as folder:
        write_json(folder / "tokenizer_config.json", [TOKENIZER_CONFIG])
        expect(lambda: load_tokenizer(folder), TokenizerError, "tokenizer_config.json: expected a JSON object")


def test_tokenizer_json_merge_the_library_would_panic_on(tok_dir: Path) -> None:
    """A merge whose join is not a token: `tokenizers` panics in Rust (not an Exception) on it."""
    with copy_of(tok_dir) as folder:
        spec = json.loads(tiny_tokenizer_json())
        del spec["model"]["vocab"]["ab"]
        write_json(folder / "tokenizer.json", spec)
        expect(lambda: load_tokenizer(folder), TokenizerError, "tokenizer.json: model.merges[0] must be two tokens")


# ---- GGUF metadata -------------------------------------------------------------------------------

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"]
GGUF_BASE: dict[str, tuple[gguf.GGUFValueType, Any]] = {
    "llama.block_count": (VT.UINT32, ARGS.n_layers),
    "llama.context_length": (VT.UINT32, ARGS.max_seq_len),
    "llama.embedding_length": (VT.UINT32, ARGS.dim),
    "llama.feed_forward_length": (VT.UINT32, ARGS.hidden_dim),
    "llama.attention.head_count": (VT.UINT32, ARGS.n_heads),
    "llama.attention.head_count_kv": (VT.UINT32, ARGS.n_kv_heads),
    "llama.attention.layer_norm_rms_epsilon": (VT.FLOAT32, ARGS.norm_eps),
    "llama.rope.freq_base": (VT.FLOAT32, ARGS.rope_theta),
    "llama.vocab_size": (VT.UINT32, ARGS.vocab_size),
    "tokenizer.ggml.model": (VT.STRING, "gpt2"),
    "tokenizer.ggml.pre": (VT.STRING, "smollm"),
    "tokenizer.ggml.tokens": (VT.ARRAY, TOKENS),
    "tokenizer.ggml.token_type": (VT.ARRAY, [3, 3, 3, 1, 1, 1]),
    "tokenizer.ggml.merges": (VT.ARRAY, ["a b"]),
    "tokenizer.ggml.bos_token_id": (VT.UINT32, 0),
    "tokenizer.ggml.eos_token_id": (VT.UINT32, 2),
}
GGUF_KEYS = sorted({*GGUF_BASE, "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.attention.key_length",
                    "llama.rope.scaling.original_context_length", "tokenizer.ggml.add_bos_token",
                    "tokenizer.chat_template", "tokenizer.ggml.scores", "tokenizer.ggml.unknown_token_id"})
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)


def gguf_ints(kind: gguf.GGUFValueType, lo: int, hi: int) -> st.SearchStrategy:
    edges = [v for v in (0, 1, 2, 3, 4, 6, 96, 128, 2**31 - 1, 2**32 - 1, -1, lo, hi) if lo <= v <= hi]
    return st.tuples(st.just(kind), st.sampled_from(edges) | st.integers(lo, hi))


GGUF_VALUES = st.one_of(
    gguf_ints(VT.UINT32, 0, 2**32 - 1), gguf_ints(VT.INT32, -2**31, 2**31 - 1),
    gguf_ints(VT.UINT64, 0, 2**64 - 1), gguf_ints(VT.INT64, -2**63, 2**63 - 1),
    st.tuples(st.just(VT.FLOAT32), st.floats(width=32)), st.tuples(st.just(VT.FLOAT64), st.floats()),
    st.tuples(st.just(VT.BOOL), st.booleans()),
    st.tuples(st.just(VT.STRING), TEXT | st.sampled_from(["linear", "yarn", "gpt2", "a b"]) | st.binary(max_size=4)),
    st.tuples(st.just(VT.ARRAY), st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=8)
              | st.lists(TEXT, min_size=1, max_size=8) | st.lists(st.floats(width=32), min_size=1, max_size=6)),
)


def write_gguf(path: Path, meta: dict[str, tuple[gguf.GGUFValueType, Any]]) -> Path:
    """A tiny F32 llama GGUF with `meta` as its metadata (values written with the given GGUF types)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in meta.items():
        w.add_key_value(key, value, kind)
    for name, t in random_state(ARGS).items():
        w.add_tensor(expand_names(GGUF_NAMES, ARGS)[name], t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(GGUF_KEYS), GGUF_VALUES, min_size=1, max_size=3),
       drop=st.sets(st.sampled_from(sorted(GGUF_BASE)), max_size=2))
def test_fuzz_gguf_metadata(tmp_path_factory: pytest.TempPathFactory, edits: dict[str, Any], drop: set[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gguf(Path(tmp) / "m.gguf", edited(GGUF_BASE, edits, drop))
        loaded = outcome(lambda: load_checkpoint(path))
        tok = outcome(lambda: tokenizer_from_gguf(gguf.GGUFReader(path)))
    if not isinstance(loaded, DOCUMENTED):
        assert_consistent(loaded)
    assert isinstance(tok, (Tokenizer, *DOCUMENTED))


def test_gguf_base_loads(tmp_path: Path) -> None:
    """The fuzz suite's starting point is a good file: its failures come from the edits."""
    path = write_gguf(tmp_path / "m.gguf", GGUF_BASE)
    assert load_checkpoint(path)[0] == dataclasses.replace(ARGS, bos_id=0)
    assert tokenizer_from_gguf(gguf.GGUFReader(path)).eos_ids == (2,)


@pytest.mark.parametrize("key, value, error, needle", [
    ("llama.block_count", (VT.STRING, "2"), ConfigError,
     "llama.block_count must be an integer in [1, 1024], found '2'"),
    ("llama.block_count", (VT.UINT32, 2**31), ConfigError, "llama.block_count must be an integer"),
    ("llama.context_length", (VT.UINT64, 2**40), ConfigError, "llama.context_length must be"),
    ("llama.context_length", (VT.INT32, -4), ConfigError, "llama.context_length must be"),
    ("llama.attention.head_count_kv", (VT.UINT32, 0), ConfigError, "llama.attention.head_count_kv must be"),
    ("llama.attention.layer_norm_rms_epsilon", (VT.STRING, "x"), ConfigError,
     "llama.attention.layer_norm_rms_epsilon must be a finite number in (0, 1], found 'x'"),
    ("llama.rope.freq_base", (VT.FLOAT32, math.nan), ConfigError, "llama.rope.freq_base must be"),
    ("llama.rope.scaling.type", (VT.STRING, b"\xff"), ConfigError, "llama.rope.scaling.type cannot be decoded"),
])
def test_gguf_metadata_of_wrong_types(tmp_path: Path, key: str, value: tuple, error: type, needle: str) -> None:
    path = write_gguf(tmp_path / "m.gguf", {**GGUF_BASE, key: value})
    expect(lambda: load_checkpoint(path), error, "m.gguf", needle)


@pytest.mark.parametrize("key, value, needle", [
    ("tokenizer.ggml.eos_token_id", (VT.UINT32, 6), "tokenizer.ggml.eos_token_id must be an integer in [0, 5]"),
    ("tokenizer.ggml.token_type", (VT.ARRAY, [3, 3]), "tokenizer.ggml.token_type must be a list of 6"),
    ("tokenizer.ggml.tokens", (VT.ARRAY, [1, 2, 3, 4, 5, 6]), "tokenizer.ggml.tokens[0] must be a str, found 1"),
    ("tokenizer.ggml.merges", (VT.ARRAY, ["x y"]), "tokenizer.ggml.merges[0] must be two tokens"),
    ("tokenizer.ggml.merges", (VT.ARRAY, ["<|im_start|> a"]), "tokenizer.ggml.merges[0] must be two tokens"),
    ("tokenizer.ggml.add_bos_token", (VT.STRING, "yes"), "tokenizer.ggml.add_bos_token must be true or false"),
    ("tokenizer.ggml.model", (VT.UINT32, 1), "tokenizer.ggml.model must be a string, found 1"),
])
def test_gguf_tokenizer_metadata_of_wrong_types(tmp_path: Path, key: str, value: tuple, needle: str) -> None:
    path = write_gguf(tmp_path / "m.gguf", {**GGUF_BASE, key: value})
    expect(lambda: tokenizer_from_gguf(gguf.GGUFReader(path)), TokenizerError, "m.gguf", needle)


def test_gguf_shapes_are_checked_before_any_tensor_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: reads.append(1) or dequantize(*a))
    path = write_gguf(tmp_path / "m.gguf", {**GGUF_BASE, "llama.feed_forward_length": (VT.UINT32, 128)})
    expect(lambda: load_checkpoint(path), WeightsError, "blk.0.ffn_gate.weight has shape (96, 64) but the config "
                                                        "implies (128, 64)")
    assert not reads


# ---- through the real CLI: exit code 2, one line on stderr, no traceback -------------------------

def bad_config_list(folder: Path) -> str:
    write_json(folder / "config.json", [HF_BASE])
    return "expected a JSON object"


def bad_layer_count(folder: Path) -> str:
    write_json(folder / "config.json", {**HF_BASE, "num_hidden_layers": 2**31})
    return "num_hidden_layers must be"


def bad_index(folder: Path) -> str:
    with_outside_shard(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../outside.safetensors" if v == SHARD else v for k, v in index["weight_map"].items()}
    write_json(folder / "model.safetensors.index.json", index)
    return "contains '..'"


@pytest.mark.parametrize("spoil", [bad_config_list, bad_layer_count, bad_index])
def test_cli_one_line_for_hostile_metadata(sharded_dir: Path, spoil: Callable[[Path], str]) -> None:
    with copy_of(sharded_dir) as folder:
        needle = spoil(folder)
        proc = run_chat("--model", str(folder), "--prompt", "hi")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert_user_error(proc, needle)
