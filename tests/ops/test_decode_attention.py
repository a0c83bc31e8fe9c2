"""Masked decode attention (one query token per row, grouped key/value heads): every path against a
float64 step-by-step reference, on random inputs with left padding, unwritten slots and holes in the
mask. The Triton kernel runs only where CUDA and triton are present."""

import importlib

import pytest
import torch

from rwkvinside.ops.decode_attention import (
    masked_decode_attention,
    masked_decode_attention_torch,
    triton_available,
)

decode_attention_module = importlib.import_module("rwkvinside.ops.decode_attention")
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                                  reason="needs CUDA and triton")


def reference(query, key, value, mask, scale):
    """Row by row and head by head in float64: softmax over the slots the row sees."""
    query, key, value = query.double(), key.double(), value.double()
    batch, heads, dim = query.shape
    group = heads // key.shape[1]
    out = torch.zeros(batch, heads, dim, dtype=torch.float64, device=query.device)
    for row in range(batch):
        for head in range(heads):
            scores = key[row, head // group] @ query[row, head] * scale
            scores[~mask[row]] = float("-inf")
            out[row, head] = torch.softmax(scores, 0) @ value[row, head // group]
    return out


def make_inputs(batch, heads, kv_heads, length, dim, dtype=torch.float32, device="cpu", seed=0):
    """query [B, H, D] as transformers leaves it (a transposed view), key/value [B, H/G, L, D], and a mask
    whose rows start at different slots (left padding), end before the cache does (slots not yet
    written) and have a hole."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 1, heads, dim, generator=generator).transpose(1, 2)[:, :, 0]
    key = torch.randn(batch, kv_heads, length, dim, generator=generator)
    value = torch.randn(batch, kv_heads, length, dim, generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        first, last = (row * 13) % (length // 2), length - 1 - (row * 29) % (length // 3)
        mask[row, first:last + 1] = True
    mask[0, (length // 2)] = False
    return [x.to(dtype=dtype, device=device) for x in (query, key, value)] + [mask.to(device)]


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (7, 1)])
def test_torch_path_is_the_reference(heads, kv_heads):
    query, key, value, mask = make_inputs(3, heads, kv_heads, 70, 16)
    out = masked_decode_attention_torch(query, key, value, mask, 0.3)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert relative_error(out, reference(query, key, value, mask, 0.3)) < 1e-6


def test_a_hidden_slot_does_not_count():
    """Changing what a hidden slot holds changes nothing; changing a seen one does."""
    query, key, value, mask = make_inputs(2, 6, 2, 40, 16)
    before = masked_decode_attention(query, key, value, mask, 0.25)
    hidden = (~mask[1]).nonzero()[0].item()
    key[1, :, hidden] += 100.0
    value[1, :, hidden] -= 100.0
    torch.testing.assert_close(masked_decode_attention(query, key, value, mask, 0.25), before, rtol=0, atol=0)
    seen = mask[1].nonzero()[0].item()
    value[1, :, seen] += 1.0
    assert not torch.equal(masked_decode_attention(query, key, value, mask, 0.25)[1], before[1])


def test_cpu_takes_the_torch_path(monkeypatch):
    calls = []
    monkeypatch.setattr(decode_attention_module, "masked_decode_attention_torch",
                        lambda *args: calls.append(args) or masked_decode_attention_torch(*args))
    masked_decode_attention(*make_inputs(1, 2, 1, 8, 16), 1.0)
    assert len(calls) == 1


@pytest.mark.parametrize("shapes, problem", [
    (((2, 6, 16), (2, 4, 10, 16), (2, 4, 10, 16), (2, 10)), "do not make"),  # 6 heads over 4
    (((2, 6, 16), (2, 3, 10, 16), (2, 3, 9, 16), (2, 10)), "do not make"),
    (((2, 6, 16), (2, 3, 10, 16), (2, 3, 10, 16), (2, 9)), "mask must be"),
])
def test_shapes_that_do_not_fit_are_refused(shapes, problem):
    query, key, value, mask = (torch.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=problem):
        masked_decode_attention(query, key, value, mask.bool(), 1.0)


@needs_triton
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3),
                                              (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("heads, kv_heads, length, dim", [(9, 3, 512, 64), (9, 3, 300, 64), (4, 4, 70, 32),
                                                          (14, 2, 129, 128), (7, 1, 64, 16)])
def test_triton_kernel_is_the_reference(dtype, tolerance, heads, kv_heads, length, dim):
    query, key, value, mask = make_inputs(5, heads, kv_heads, length, dim, dtype=dtype, device="cuda")
    out = masked_decode_attention(query, key, value, mask, dim ** -0.5)
    assert out.shape == query.shape and out.dtype == dtype
    assert relative_error(out, reference(query, key, value, mask, dim ** -0.5)) < tolerance


@needs_triton
def test_cuda_takes_the_triton_kernel(monkeypatch):
    monkeypatch.setattr(decode_attention_module, "masked_decode_attention_torch",
                        lambda *args: pytest.fail("the torch path ran on CUDA"))
    masked_decode_attention(*make_inputs(2, 6, 2, 64, 64, dtype=torch.bfloat16, device="cuda"), 0.125)
