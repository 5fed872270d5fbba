import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread beats two on shared cores (no oversubscription); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
