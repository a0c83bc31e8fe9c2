"""Held-out windows: the training contract, in order, every token after the first scored once."""

import torch

from rwkvinside.data import IGNORE_INDEX, heldout_batches, target_tokens

from .helpers import DOCS, reference_stream


def test_every_token_after_the_first_is_a_target_once(tiny_tokenizer, text_corpus):
    stream = reference_stream(tiny_tokenizer, DOCS)
    batches = list(heldout_batches([text_corpus], tiny_tokenizer, seq_len=15, batch_size=3))
    labels = torch.cat([batch["labels"] for batch in batches]).flatten()
    assert labels[labels != IGNORE_INDEX].tolist() == stream[1:]
    assert sum(int(target_tokens(batch)) for batch in batches) == len(stream) - 1


def test_windows_are_shifted_once_and_the_tail_is_padded(tiny_tokenizer, text_corpus):
    assert (len(reference_stream(tiny_tokenizer, DOCS)) - 1) % 15 != 0  # so there is a tail
    batches = list(heldout_batches([text_corpus], tiny_tokenizer, seq_len=15, batch_size=3))
    assert all(batch["input_ids"].shape[1] == 15 for batch in batches)
    assert batches[0]["input_ids"].shape[0] == 3 and batches[-1]["input_ids"].shape[0] <= 3
    rows = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    real = rows["attention_mask"].bool()
    assert bool((rows["labels"][~real] == IGNORE_INDEX).all())
    assert not bool(real[-1].all())  # the tail window is shorter than seq_len
    assert torch.equal(rows["labels"][:, :-1][real[:, 1:]], rows["input_ids"][:, 1:][real[:, 1:]])
