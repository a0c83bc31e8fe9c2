"""A CUDA graph capture that fails leaves the device's random generator as it was (GPU only)."""

import pytest
import torch

from rwkvinside.graph_capture import capturing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_after_a_failed_capture_the_generator_draws_as_if_there_had_been_none():
    torch.cuda.manual_seed(0)
    expected = torch.randn(4, device="cuda")
    torch.cuda.manual_seed(0)
    ones = torch.ones(1, device="cuda")
    with pytest.raises(RuntimeError), capturing(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
        torch.randn(4, device="cuda")  # a draw inside the capture, never run
        ones.sum().item()  # a read back to the host: CUDA refuses it
    assert torch.equal(torch.randn(4, device="cuda"), expected)


def test_a_captured_draw_is_fresh_at_every_replay():
    """What the generator's capture mode is for, kept by `capturing`: each replay draws anew."""
    noise = torch.empty(4, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with capturing(graph):
        noise.normal_()
    graph.replay()
    first = noise.clone()
    graph.replay()
    assert not torch.equal(noise, first)
