import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The command line sets torch's thread count; keep other tests' setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
