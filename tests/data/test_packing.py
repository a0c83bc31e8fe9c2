"""Packing: EOS-joined stream, windows of seq_len+1 overlapping by one, labels shifted exactly once."""

import copy

import numpy as np
import pytest
import torch

from rwkvinside.data import IGNORE_INDEX, PackedDataset, iter_texts, pack_windows, tokenize_stream
from rwkvinside.data.packing import Lead, packed_sample
from rwkvinside.errors import UserError

from .helpers import DOCS, reference_stream

SEQ_LEN = 16


@pytest.fixture
def dataset(tiny_tokenizer) -> PackedDataset:
    return PackedDataset.from_texts(DOCS, tiny_tokenizer, SEQ_LEN)


def test_stream_is_documents_joined_by_eos(tiny_tokenizer):
    stream = np.concatenate(list(tokenize_stream(DOCS, tiny_tokenizer))).tolist()
    assert stream == reference_stream(tiny_tokenizer, DOCS)
    eos = tiny_tokenizer.eos_token_id
    ends = [i for i, token in enumerate(stream) if token == eos]
    assert len(ends) == len(DOCS) and ends[-1] == len(stream) - 1
    assert tiny_tokenizer.decode(stream[: ends[0]]) == DOCS[0]  # no BOS, nothing added


def test_labels_are_the_next_token_of_the_stream_shifted_once(tiny_tokenizer, dataset):
    stream = reference_stream(tiny_tokenizer, DOCS)
    for i in range(len(dataset)):
        sample = dataset[i]
        start = i * SEQ_LEN
        assert sample["input_ids"].tolist() == stream[start: start + SEQ_LEN]
        assert sample["labels"].tolist() == stream[start + 1: start + SEQ_LEN + 1]
        for t in range(SEQ_LEN - 1):  # the contract, literally: labels[t] == input_ids[t+1]
            assert sample["labels"][t] == sample["input_ids"][t + 1]


def test_no_target_token_lost_across_windows(tiny_tokenizer, dataset):
    stream = reference_stream(tiny_tokenizer, DOCS)
    assert len(dataset) == (len(stream) - 1) // SEQ_LEN
    targets = torch.cat([dataset[i]["labels"] for i in range(len(dataset))]).tolist()
    assert targets == stream[1: len(dataset) * SEQ_LEN + 1]  # contiguous: every target exactly once
    assert dataset.num_target_tokens == len(targets)


def test_packed_samples_are_full_long_tensors(dataset):
    sample = dataset[0]
    for key in ("input_ids", "labels", "attention_mask"):
        assert sample[key].dtype == torch.long and sample[key].shape == (SEQ_LEN,)
    assert bool((sample["attention_mask"] == 1).all()) and bool((sample["labels"] != IGNORE_INDEX).all())


def test_streaming_windows_equal_in_memory_windows(tiny_tokenizer, dataset):
    # Tiny chunks force windows to straddle chunk boundaries.
    chunks = np.array_split(np.asarray(reference_stream(tiny_tokenizer, DOCS), dtype=np.int32), 37)
    windows = list(pack_windows(chunks, SEQ_LEN))
    assert len(windows) == len(dataset)
    for i, window in enumerate(windows):
        for key, value in packed_sample(window, SEQ_LEN).items():
            assert torch.equal(value, dataset[i][key])


# ---- eos_first: every window starts with the EOS, as a document does --------------------------------


@pytest.fixture
def eos_first_dataset(tiny_tokenizer) -> PackedDataset:
    return PackedDataset.from_texts(DOCS, tiny_tokenizer, SEQ_LEN, eos_first=True)


def test_with_eos_first_a_window_is_the_eos_then_the_next_seq_len_stream_tokens(tiny_tokenizer,
                                                                                eos_first_dataset):
    stream, eos = reference_stream(tiny_tokenizer, DOCS), tiny_tokenizer.eos_token_id
    assert len(eos_first_dataset) == len(stream) // SEQ_LEN
    for i in range(len(eos_first_dataset)):
        sample = eos_first_dataset[i]
        chunk = stream[i * SEQ_LEN: (i + 1) * SEQ_LEN]
        assert sample["input_ids"].tolist() == [eos] + chunk[:-1]
        assert sample["labels"].tolist() == chunk  # the first stream token is predicted from the EOS alone


def test_with_eos_first_every_stream_token_is_a_target_exactly_once(tiny_tokenizer, eos_first_dataset):
    stream = reference_stream(tiny_tokenizer, DOCS)
    targets = torch.cat([eos_first_dataset[i]["labels"] for i in range(len(eos_first_dataset))]).tolist()
    assert targets == stream[: len(eos_first_dataset) * SEQ_LEN]
    assert eos_first_dataset.num_target_tokens == len(targets)


def test_with_eos_first_streaming_windows_equal_in_memory_windows(tiny_tokenizer, eos_first_dataset):
    chunks = np.array_split(np.asarray(reference_stream(tiny_tokenizer, DOCS), dtype=np.int32), 37)
    windows = list(pack_windows(chunks, SEQ_LEN, lead=Lead(tiny_tokenizer.eos_token_id)))
    assert len(windows) == len(eos_first_dataset)
    for i, window in enumerate(windows):
        for key, value in packed_sample(window, SEQ_LEN).items():
            assert torch.equal(value, eos_first_dataset[i][key])


def test_with_eos_first_a_corpus_of_seq_len_tokens_is_enough(tiny_tokenizer):
    count = len(reference_stream(tiny_tokenizer, ["tiny"]))
    assert len(PackedDataset.from_texts(["tiny"], tiny_tokenizer, count, eos_first=True)) == 1
    with pytest.raises(UserError, match=rf"has {count} tokens but one training sequence needs {count + 1}"):
        PackedDataset.from_texts(["tiny"], tiny_tokenizer, count + 1, eos_first=True)


def test_corpus_too_small_for_one_sequence(tiny_tokenizer):
    count = len(reference_stream(tiny_tokenizer, ["tiny"]))
    message = rf"has {count} tokens but one training sequence needs 65; give a smaller --seq-len"
    with pytest.raises(UserError, match=message):
        PackedDataset.from_texts(["tiny"], tiny_tokenizer, 64)
    with pytest.raises(UserError, match=message):
        list(pack_windows(tokenize_stream(["tiny"], tiny_tokenizer), 64))


def test_tokenizer_without_eos(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(UserError, match="the tokenizer has no end-of-text token"):
        PackedDataset.from_texts(DOCS, tokenizer, SEQ_LEN)


def test_from_files(tiny_tokenizer, text_corpus):
    from_files = PackedDataset.from_texts(iter_texts([text_corpus]), tiny_tokenizer, SEQ_LEN)
    assert from_files.tokens.tolist() == reference_stream(tiny_tokenizer, DOCS)


# ---- eos_first as a fraction: some windows led by the EOS, the others plain ---------------------------


@pytest.mark.parametrize("fraction, led", [(1.0, [True] * 6), (0.5, [True, False] * 3),
                                           (1 / 3, [True, False, False] * 2), (0.25, [True, False, False, False, True, False])])
def test_a_fraction_of_the_windows_is_led_evenly_from_the_first(fraction, led):
    assert [Lead(0, fraction).leads(i) for i in range(6)] == led


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_with_a_fraction_led_every_stream_token_is_still_a_target_exactly_once(tiny_tokenizer, fraction):
    """A led window is the EOS and the next T tokens; an unled one the token before and the same T:
    both predict the same T targets, so the targets are the stream in order, whichever windows lead."""
    stream, eos = reference_stream(tiny_tokenizer, DOCS), tiny_tokenizer.eos_token_id
    dataset = PackedDataset.from_texts(DOCS, tiny_tokenizer, SEQ_LEN, eos_first=fraction)
    assert len(dataset) == len(stream) // SEQ_LEN
    lead = Lead(eos, fraction)
    for i in range(len(dataset)):
        inputs = dataset[i]["input_ids"].tolist()
        chunk = stream[i * SEQ_LEN: (i + 1) * SEQ_LEN]
        assert dataset[i]["labels"].tolist() == chunk
        assert inputs == ([eos] if lead.leads(i) else [stream[i * SEQ_LEN - 1]]) + chunk[:-1]
    assert sum(lead.leads(i) for i in range(len(dataset))) == pytest.approx(fraction * len(dataset), abs=1)

    chunks = np.array_split(np.asarray(stream, dtype=np.int32), 37)  # streaming cuts the same windows
    windows = list(pack_windows(chunks, SEQ_LEN, lead=lead))
    assert len(windows) == len(dataset)
    for i, window in enumerate(windows):
        for key, value in packed_sample(window, SEQ_LEN).items():
            assert torch.equal(value, dataset[i][key])


def test_a_lead_fraction_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="fraction"):
        Lead(0, 1.5)
