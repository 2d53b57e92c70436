"""Shared fixtures: the real default model (converted once into weights/) and tiny random HF models."""
from __future__ import annotations

import pytest
import torch

# helpers.py holds asserts (assert_within) that were in test modules: keep pytest's assertion rewriting on them
pytest.register_assert_rewrite("tests.helpers")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: real-model tests that take more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir():
    from engine.fetch import fetch_default_model

    return fetch_default_model()


@pytest.fixture(scope="session")
def smollm(default_model_dir):
    import engine

    return engine.load(default_model_dir, policy="full")


TINY_CONTEXT = 256  # the tiny model's context: LongBench prompts get truncated, ppl can run past it


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir, tmp_path_factory: pytest.TempPathFactory):
    """A random 2-layer model with the default model's tokenizer and chat template (CLIs end to end in seconds)."""
    import shutil

    from engine.weights import save_hf_folder

    from .helpers import random_state, tiny_args

    args = tiny_args(vocab_size=49152, max_seq_len=TINY_CONTEXT)
    dst = save_hf_folder(args, random_state(args), tmp_path_factory.mktemp("tiny") / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, dst / name)
    return dst
