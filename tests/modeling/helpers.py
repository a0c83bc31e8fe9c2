"""Plain helpers shared by the modeling tests."""

import torch
from torch import nn

from rwkvinside.modeling.teachers import FAMILIES, attention_of

VOCAB_SIZE = 320  # the tiny teachers' vocabulary (tests/conftest.py)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=generator)


def attention_slots(model: nn.Module, family: str) -> list[nn.Module]:
    """The module in each decoder layer's attention slot (teacher attention, wrapper or student)."""
    return [attention_of(layer, FAMILIES[family]) for layer in model.model.layers]


@torch.no_grad()
def perturb_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Move every parameter away from its initial value, so that no term of the forward pass is
    trivially zero or one (the output projection and the LoRA down-projections start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))
    return module
