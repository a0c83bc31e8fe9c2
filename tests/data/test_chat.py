"""SFT rendering: assistant content and end-of-turn are the only targets; truncation, padding, errors."""

import copy
import logging

import pytest
import torch

from rwkvinside.data import IGNORE_INDEX, ChatDataset, Record, collate, iter_conversations, target_tokens
from rwkvinside.errors import UserError

from .helpers import CONVERSATIONS

# SmolLM2's template in miniature: ChatML that adds a default system turn when there is none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Renders earlier assistant turns differently from the last one (as reasoning templates do).
REWRITING_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = message['content'] if loop.last or message['role'] != 'assistant' else '...' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations must start with user') }}"
    "{% endif %}" + DEFAULT_SYSTEM_TEMPLATE
)
# Its generation prompt names the assistant "bot", its conversations "assistant": never a prefix.
MISMATCHED_PROMPT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>bot\n' }}{% endif %}"
)
IGNORES_GENERATION_PROMPT = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}"
)


def records(conversations: list) -> list[Record]:
    return [Record(origin=f"test:{i}", messages=messages) for i, messages in enumerate(conversations)]


def with_template(tokenizer, template: str | None):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def labelled_runs(sample: dict, tokenizer) -> list[str]:
    """The decoded text of each maximal run of consecutive targets."""
    runs, current = [], []
    for label in sample["labels"].tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def assistant_runs(conversation: list) -> list[str]:
    return [message["content"] + "<|im_end|>" for message in conversation if message["role"] == "assistant"]


@pytest.mark.parametrize("template", [None, DEFAULT_SYSTEM_TEMPLATE])
def test_only_assistant_content_and_end_of_turn_are_targets(tiny_tokenizer, template):
    tokenizer = tiny_tokenizer if template is None else with_template(tiny_tokenizer, template)
    dataset = ChatDataset.from_records(records(CONVERSATIONS), tokenizer, seq_len=128)
    assert len(dataset) == len(CONVERSATIONS)
    for i, conversation in enumerate(CONVERSATIONS):
        assert labelled_runs(dataset[i], tokenizer) == assistant_runs(conversation)


def test_labels_are_the_next_input_token_shifted_once(tiny_tokenizer):
    dataset = ChatDataset.from_records(records(CONVERSATIONS), tiny_tokenizer, seq_len=128)
    rendered = tiny_tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    stream = tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    sample = dataset[0]
    length = len(stream) - 1
    assert sample["input_ids"][:length].tolist() == stream[:-1]
    trained = sample["labels"] != IGNORE_INDEX
    positions = trained.nonzero().flatten().tolist()
    assert all(sample["labels"][t] == stream[t + 1] for t in positions)
    # The first target follows the role header: the header's last token predicts the answer.
    first = positions[0]
    assert tiny_tokenizer.decode(stream[: first + 1]).endswith("<|im_start|>assistant\n")


def test_padding_is_right_masked_and_never_counted(tiny_tokenizer):
    dataset = ChatDataset.from_records(records(CONVERSATIONS), tiny_tokenizer, seq_len=128)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["input_ids"].shape == (3, 128) and batch["input_ids"].dtype == torch.long
    padding = batch["attention_mask"] == 0
    assert bool(padding.any()) and bool((batch["labels"][padding] == IGNORE_INDEX).all())
    lengths = batch["attention_mask"].sum(1)
    assert bool((batch["attention_mask"].cumsum(1).max(1).values == lengths).all())  # right padding
    expected = sum(len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
                   for conversation in CONVERSATIONS for text in assistant_runs(conversation))
    assert int(target_tokens(batch)) == expected == dataset.num_target_tokens


def test_long_conversations_truncated_and_logged_once(tiny_tokenizer, caplog):
    long = [{"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "To be, or not to be. " * 20}]
    with caplog.at_level(logging.WARNING):
        dataset = ChatDataset.from_records(records([long, long, CONVERSATIONS[2]]), tiny_tokenizer, 64)
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 3 conversations are longer than seq_len 64 tokens and were truncated"]
    sample = dataset[0]
    assert bool(sample["attention_mask"].all())  # filled to seq_len, the final token a target only
    assert sample["labels"][-1] != IGNORE_INDEX


def test_conversations_without_trainable_tokens_are_skipped(tiny_tokenizer):
    no_assistant = [{"role": "user", "content": "Anyone there?"}]
    cut_before_answer = [{"role": "user", "content": "To be, or not to be. " * 20},
                         {"role": "assistant", "content": "Yes."}]
    dataset = ChatDataset.from_records(records([no_assistant, cut_before_answer, CONVERSATIONS[2]]),
                                       tiny_tokenizer, seq_len=64)
    assert len(dataset) == 1


def test_no_assistant_turn_at_all(tiny_tokenizer):
    with pytest.raises(UserError, match="none of the 2 conversations has an assistant turn"):
        ChatDataset.from_records(records([[{"role": "user", "content": "Hi"}]] * 2), tiny_tokenizer, 64)


def test_every_answer_cut_off(tiny_tokenizer):
    conversation = [{"role": "user", "content": "To be, or not to be. " * 20},
                    {"role": "assistant", "content": "Yes."}]
    with pytest.raises(UserError, match="no assistant token of the 1 conversations fits in --seq-len 16"):
        ChatDataset.from_records(records([conversation]), tiny_tokenizer, 16)


def test_tokenizer_without_chat_template(tiny_tokenizer):
    with pytest.raises(UserError, match="the tokenizer has no chat template"):
        ChatDataset.from_records(records(CONVERSATIONS), with_template(tiny_tokenizer, None), 64)


def test_turns_rendered_inconsistently_are_not_trained(tiny_tokenizer, caplog):
    tokenizer = with_template(tiny_tokenizer, REWRITING_TEMPLATE)
    with caplog.at_level(logging.WARNING):
        dataset = ChatDataset.from_records(records(CONVERSATIONS[:1]), tokenizer, 128)
    assert labelled_runs(dataset[0], tokenizer) == ["John Milton.<|im_end|>"]
    assert "1 of 2 assistant turns are not trained" in caplog.text


def test_template_whose_prompts_never_match(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, MISMATCHED_PROMPT_TEMPLATE)
    with pytest.raises(UserError, match="the chat template renders no assistant turn the same way"):
        ChatDataset.from_records(records(CONVERSATIONS), tokenizer, 128)


def test_template_rejecting_a_conversation_names_the_record(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, STRICT_TEMPLATE)
    with pytest.raises(UserError, match=r"test:1: the chat template rejected this conversation \(conv"):
        ChatDataset.from_records(records(CONVERSATIONS), tokenizer, 128)


def test_template_ignoring_generation_prompt_is_reported(tiny_tokenizer, caplog):
    tokenizer = with_template(tiny_tokenizer, IGNORES_GENERATION_PROMPT)
    with caplog.at_level(logging.WARNING):
        ChatDataset.from_records(records(CONVERSATIONS), tokenizer, 128)
    assert "ignores add_generation_prompt" in caplog.text


def test_from_jsonl(tiny_tokenizer, chat_file):
    dataset = ChatDataset.from_records(iter_conversations([chat_file]), tiny_tokenizer, 128)
    assert labelled_runs(dataset[1], tiny_tokenizer) == ["Hello!<|im_end|>"]
