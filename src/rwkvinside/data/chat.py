"""Chat data for SFT (stage 3): render conversations with the chat template, train on assistant tokens.

Most chat templates (SmolLM2's, Qwen2's) have no `{% generation %}` markers, so assistant tokens
are found by rendering prefixes: for assistant turn i, `prompt` = messages[:i] rendered with
`add_generation_prompt=True` (ends after the role header) and `turn` = messages[:i+1] rendered
without it. When both are token prefixes of the whole conversation, the tokens between their ends
are the assistant's content and the end-of-turn token; whitespace the template writes after that
token (ChatML's newline) is not trained. A turn whose prefixes do not match (templates that
rewrite earlier turns, e.g. dropping reasoning) is left untrained, counted and reported once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jinja2 import TemplateError

from rwkvinside.data.batch import Sample, shifted_sample
from rwkvinside.data.packing import pad_id
from rwkvinside.data.sources import Message, Record
from rwkvinside.errors import UserError

if TYPE_CHECKING:  # transformers is slow to import and only named in annotations
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Conversation = tuple[torch.Tensor, torch.Tensor]  # token ids [n] int32, assistant-token mask [n] bool


@dataclass
class RenderStats:
    """What rendering a pass over the data found; reported once at the end of the pass."""

    conversations: int = 0
    assistant_turns: int = 0
    unmatched_turns: int = 0
    truncated: int = 0
    dropped: int = 0  # no target token left (no assistant turn, or cut off by truncation)


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise `UserError` when the tokenizer cannot render chats; warn when prompts cannot be told apart."""
    if not tokenizer.chat_template:
        raise UserError("the tokenizer has no chat template, which SFT needs to render conversations; use "
                        "an instruct model's tokenizer or set tokenizer.chat_template")
    probe = [{"role": "user", "content": "hello"}]
    try:
        same = _render(probe, tokenizer, True, "probe") == _render(probe, tokenizer, False, "probe")
    except UserError:  # templates that insist on a system turn or similar: nothing to learn here
        return
    if same:
        logger.warning("the chat template ignores add_generation_prompt, so each assistant role header "
                       "is trained as part of the assistant's answer")


def _render(messages: list[Message], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool,
            origin: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise UserError(f"{origin}: the chat template rejected this conversation ({error}); fix or remove "
                        "that record") from None


def assistant_tokens(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[bool], int]:
    """Token ids of the rendered conversation [n], which are assistant targets [n], and unmatched turns."""
    messages = record.messages or []
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    texts = [_render(messages, tokenizer, False, record.origin)]
    for i in turns:
        texts += [_render(messages[:i], tokenizer, True, record.origin),
                  _render(messages[: i + 1], tokenizer, False, record.origin)]
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = encoded["input_ids"]
    full, prefixes = ids[0], ids[1:]
    mask = [False] * len(full)
    unmatched = 0
    for prompt, turn in zip(prefixes[::2], prefixes[1::2]):
        start, end = len(prompt), len(turn)
        if start >= end or full[:start] != prompt or full[:end] != turn:
            unmatched += 1
            continue
        end = _strip_trailing_whitespace(full, start, end, tokenizer)
        mask[start:end] = [True] * (end - start)
    return full, mask, unmatched


def _strip_trailing_whitespace(ids: list[int], start: int, end: int,
                               tokenizer: PreTrainedTokenizerBase) -> int:
    """End of span ids[start:end] without trailing whitespace-only tokens (never generated before EOT)."""
    while end > start and not tokenizer.decode(ids[end - 1: end]).strip():
        end -= 1
    return end


def render_conversations(records: Iterable[Record], tokenizer: PreTrainedTokenizerBase,
                         seq_len: int) -> Iterator[Conversation]:
    """Each conversation as (token ids [n], assistant mask [n]), n <= seq_len+1 (longer ones truncated).

    Conversations left without a target token are dropped. Raises `UserError` at the end of the pass
    when nothing is trainable.
    """
    check_chat_template(tokenizer)
    stats = RenderStats()
    for record in records:
        ids, mask, unmatched = assistant_tokens(record, tokenizer)
        stats.conversations += 1
        stats.assistant_turns += sum(message["role"] == "assistant" for message in record.messages or [])
        stats.unmatched_turns += unmatched
        if len(ids) > seq_len + 1:  # the last token is a target only, so seq_len+1 tokens still fit
            stats.truncated += 1
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        if not any(mask[1:]):
            stats.dropped += 1
            continue
        yield torch.tensor(ids, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool)
    _report(stats, seq_len)


def _report(stats: RenderStats, seq_len: int) -> None:
    if stats.assistant_turns == 0:
        raise UserError(f"none of the {stats.conversations} conversations has an assistant turn, so SFT has "
                        "nothing to train on; give chat data with 'assistant' messages")
    if stats.unmatched_turns == stats.assistant_turns:
        raise UserError("the chat template renders no assistant turn the same way as a prefix (with "
                        "add_generation_prompt) as inside the whole conversation, so assistant tokens cannot "
                        "be found; use a template whose conversation prefixes render as token prefixes")
    if stats.dropped == stats.conversations:
        raise UserError(f"no assistant token of the {stats.conversations} conversations fits in --seq-len "
                        f"{seq_len}; raise --seq-len or shorten the prompts")
    if stats.truncated:
        logger.warning("%d of %d conversations are longer than seq_len %d tokens and were truncated",
                       stats.truncated, stats.conversations, seq_len)
    if stats.unmatched_turns:
        logger.warning("%d of %d assistant turns are not trained: the chat template renders them differently "
                       "as a prefix than inside the whole conversation", stats.unmatched_turns,
                       stats.assistant_turns)
    if stats.dropped:
        logger.info("%d conversations without a trainable assistant token were skipped", stats.dropped)


def conversation_sample(conversation: Conversation, seq_len: int, pad: int) -> Sample:
    """The right-padded training sample [seq_len] of one rendered conversation."""
    ids, mask = conversation
    return shifted_sample(ids, seq_len, pad, target_mask=mask)


class ChatDataset:
    """Rendered conversations in memory (unpadded), padded to seq_len when an item is taken."""

    def __init__(self, conversations: list[Conversation], seq_len: int, pad: int) -> None:
        self.conversations = conversations
        self.seq_len = seq_len
        self.pad = pad

    @classmethod
    def from_records(cls, records: Iterable[Record], tokenizer: PreTrainedTokenizerBase,
                     seq_len: int) -> "ChatDataset":
        return cls(list(render_conversations(records, tokenizer, seq_len)), seq_len, pad_id(tokenizer))

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Sample:
        return conversation_sample(self.conversations[index], self.seq_len, self.pad)

    @property
    def num_target_tokens(self) -> int:
        """Assistant target tokens over all conversations (the first token is never a target)."""
        return sum(int(mask[1:].sum()) for _, mask in self.conversations)
