"""Model tests run single-threaded: tiny tiles gain little from threads, and intra-op threads
oversubscribe a busy 2-core machine (spin-waiting made this suite ~7x slower under load)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Run each model test with one torch thread, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
