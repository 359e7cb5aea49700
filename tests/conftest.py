"""Fixtures shared by the test files; plain shared helpers (paths, composing configs, tiny overrides, the
paper's pruning method, a tiny metanetwork checkpoint) are in ``tests/helpers.py`` (``from helpers import ...``)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread avoids oversubscribing the shared CPU and keeps results independent of
    the thread count. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
