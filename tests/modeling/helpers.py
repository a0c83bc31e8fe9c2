"""Plain helpers shared by the modeling tests."""

import torch
from torch import nn

from rwkvinside.modeling.alignment import attach_teacher_attention
from rwkvinside.modeling.convert import ConversionSpec, convert
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.teachers import FAMILIES, attention_of

VOCAB_SIZE = 320  # the tiny teachers' vocabulary (tests/conftest.py)
HIDDEN_SIZE = 64  # the tiny teachers' width
BATCH, LENGTH = 2, 12


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=generator)


def right_padding_mask(pad: int = 3) -> torch.Tensor:
    """[BATCH, LENGTH]: row 0 ends with `pad` padding positions; row 1 is all real tokens."""
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, LENGTH - pad:] = 0
    return mask


def attention_slots(model: nn.Module, family: str) -> list[nn.Module]:
    """The module in each decoder layer's attention slot (teacher attention, AligningAttention or
    RWKVAttention), for a teacher or a student alike (both keep their layers in `model.model.layers`)."""
    return [attention_of(layer, FAMILIES[family]) for layer in model.model.layers]


def aligning_student(teacher: nn.Module, spec: ConversionSpec = ConversionSpec()) -> RWKVInsideForCausalLM:
    """Stage 1's student: converted, with the teacher's attentions attached beside its mixers."""
    student = convert(teacher, spec)
    attach_teacher_attention(student, teacher)
    return student


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of the same memory (not merely equal values)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@torch.no_grad()
def perturb_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Move every parameter away from its initial value, so that no term of the forward pass is
    trivially zero or one (the output projection and the LoRA down-projections start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))
    return module
