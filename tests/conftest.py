import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny tensors run on one thread: OpenMP spin-waits make two threads up to 30x slower on a
    busy 2-core machine. Tests on the real model (marked slow) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
