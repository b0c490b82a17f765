"""Shared test set-up: deterministic torch, few threads (the CI machine has 2 cores)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.manual_seed(0)
    yield
