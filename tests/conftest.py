"""Shared fixtures: the real default model (converted once into weights/) and tiny random HF models."""
from __future__ import annotations

import pytest
import torch


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
