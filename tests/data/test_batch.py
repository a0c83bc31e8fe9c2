"""The batch contract: one shift, right padding, padding never a target and never counted."""

import pytest
import torch

from rwkvinside.data import IGNORE_INDEX, collate, shifted_sample, target_mask, target_tokens


def test_short_sample_is_right_padded_and_padding_is_never_a_target():
    tokens = torch.tensor([5, 6, 7, 8])
    sample = shifted_sample(tokens, seq_len=6, pad_id=0)
    assert sample["input_ids"].tolist() == [5, 6, 7, 0, 0, 0]
    assert sample["labels"].tolist() == [6, 7, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert sample["attention_mask"].tolist() == [1, 1, 1, 0, 0, 0]


def test_target_mask_hides_targets_that_are_not_trained():
    tokens = torch.tensor([5, 6, 7, 8])
    mask = torch.tensor([False, False, True, True])
    sample = shifted_sample(tokens, seq_len=3, pad_id=0, target_mask=mask)
    assert sample["labels"].tolist() == [IGNORE_INDEX, 7, 8]


def test_target_tokens_ignores_padding_and_masked_positions():
    batch = collate([shifted_sample(torch.tensor([1, 2, 3]), 5, 0),
                     shifted_sample(torch.tensor([1, 2, 3, 4, 5, 6]), 5, 0,
                                    target_mask=torch.tensor([True, True, False, True, True, True]))])
    assert batch["labels"].shape == (2, 5)
    count = target_tokens(batch)
    assert isinstance(count, torch.Tensor) and count.dim() == 0  # read back only when the caller wants
    assert int(count) == 2 + 4  # row 2: its second target is masked out
    assert int(count) < int(batch["attention_mask"].sum()) < int(batch["attention_mask"].numel())
    assert target_mask(batch["labels"]).tolist() == [[True, True, False, False, False],
                                                     [True, False, True, True, True]]


@pytest.mark.parametrize("length", [1, 8])
def test_sample_length_out_of_range(length):
    with pytest.raises(ValueError, match="a sample needs 2..7 tokens"):
        shifted_sample(torch.arange(length), seq_len=6, pad_id=0)
