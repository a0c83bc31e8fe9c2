"""The prompts `rwkvinside synth` samples the teacher from: three kinds, mixed in given shares.

- `chat`: an instruction from `prompts/instructions.txt` (a few hundred, across many domains) in
  the teacher's chat template, ready for the assistant's answer: the teacher answers as it was
  tuned to;
- `documents`: the start-of-text token and the opening of a document of `--prompts` (the first
  sentence of a paragraph, at most OPENING_TOKENS tokens): the teacher continues real text;
- `free`: the start-of-text token alone: the teacher writes whatever it likes.

The start-of-text token is the tokenizer's BOS, or EOS where it has none (EOS then stands between
documents, as in the streams the teacher was trained on). A prompt may take at most half of a
sample, so that every sample is mostly the teacher's own writing; longer ones are left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from itertools import islice
from typing import TYPE_CHECKING

from rwkvinside.errors import UserError

if TYPE_CHECKING:  # only named in annotations
    import numpy as np
    from transformers import PreTrainedTokenizerBase

KINDS = ("chat", "documents", "free")
DEFAULT_MIX = {"chat": 0.5, "documents": 0.25, "free": 0.25}  # documents only where --prompts is given
OPENING_TOKENS = 32  # the most tokens of a document opening
MAX_OPENINGS = 100_000  # openings read from --prompts: enough variety without reading a huge corpus whole
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
TEXTS_PER_CALL = 256  # texts per batched tokenizer call


@dataclass(frozen=True)
class Prompt:
    kind: str  # one of KINDS
    ids: tuple[int, ...]


def parse_mix(text: str) -> dict[str, float]:
    """'chat=0.5,documents=0.25,free=0.25' -> the shares of the kinds, scaled to sum to 1; an argparse
    `type`, so a malformed mix is refused with one line."""
    import argparse

    shares: dict[str, float] = {}
    for part in text.split(","):
        kind, equals, value = part.partition("=")
        kind = kind.strip()
        if not equals or kind not in KINDS:
            raise argparse.ArgumentTypeError(f"'{part}' is not KIND=SHARE, KIND one of {', '.join(KINDS)}")
        try:
            shares[kind] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"the share of {kind} must be a number, not '{value}'") from None
        if not shares[kind] >= 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"the share of {kind} must be >= 0, not {value}")
    total = sum(shares.values())
    if not 0 < total < float("inf"):
        raise argparse.ArgumentTypeError("the shares must add up to a positive number")
    return {kind: shares[kind] / total for kind in KINDS if shares.get(kind)}


def resolve_mix(mix: dict[str, float] | None, have_documents: bool) -> dict[str, float]:
    """The shares to sample: `mix` as given, or the default one (without documents when there is no
    --prompts). Documents asked for without --prompts are refused."""
    if mix is None:
        mix = {kind: share for kind, share in DEFAULT_MIX.items() if have_documents or kind != "documents"}
    elif mix.get("documents") and not have_documents:
        raise UserError("--mix asks for document openings but no --prompts was given; give --prompts FILE "
                        "(text, JSONL or Parquet, or a folder of them) or leave documents out of --mix")
    total = sum(mix.values())
    return {kind: share / total for kind, share in mix.items()}


class PromptPool:
    """Every prompt of each kind of the mix, tokenised once; `draw` picks a batch of them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, mix: dict[str, float], documents: str | None,
                 max_tokens: int) -> None:
        """documents: the --prompts path (needed when the mix has documents); max_tokens: the longest
        prompt kept."""
        self.mix = mix
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        build = {"chat": lambda: chat_prompts(tokenizer),
                 "documents": lambda: [(start, *opening)
                                       for opening in openings(documents, tokenizer, max_tokens - 1)],
                 "free": lambda: [(start,)]}
        self.pools = {kind: _fitting(build[kind](), max_tokens, kind) for kind in mix}

    def draw(self, count: int, rng: np.random.Generator) -> list[Prompt]:
        """`count` prompts: each of a kind drawn by the shares, then one of that kind's prompts."""
        kinds = list(self.mix)
        chosen = rng.choice(len(kinds), size=count, p=[self.mix[kind] for kind in kinds])
        prompts = []
        for index in chosen:
            pool = self.pools[kinds[index]]
            prompts.append(Prompt(kinds[index], pool[int(rng.integers(len(pool)))]))
        return prompts


def instructions() -> list[str]:
    """The instructions shipped with the package, one a line (# starts a comment)."""
    text = files("rwkvinside.generation").joinpath("prompts/instructions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def chat_prompts(tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, ...]]:
    """Each instruction as a user turn in the chat template, followed by the assistant's header."""
    if not tokenizer.chat_template:
        raise UserError("the teacher's tokenizer has no chat template, so it cannot be given chat prompts; "
                        "leave chat out of --mix (e.g. --mix free=1)")
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                              add_generation_prompt=True) for instruction in instructions()]
    # The template writes its special tokens as text; tokenising with no extras adds none twice.
    return [tuple(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def openings(path: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[tuple[int, ...]]:
    """Token ids of the first sentence of each paragraph of the documents at `path`, cut to at most
    min(OPENING_TOKENS, max_tokens) tokens."""
    limit = min(OPENING_TOKENS, max_tokens)
    sentences = list(islice(_first_sentences(path), MAX_OPENINGS))
    found = []
    for start in range(0, len(sentences), TEXTS_PER_CALL):
        batch = sentences[start: start + TEXTS_PER_CALL]
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        found += [tuple(ids[:limit]) for ids in encoded if ids]
    return found


def _first_sentences(path: str) -> Iterator[str]:
    from rwkvinside.data import iter_texts

    for text in iter_texts([path]):
        for paragraph in PARAGRAPH_BREAK.split(text):
            paragraph = paragraph.strip()[:OPENING_TOKENS * 16]  # ample for OPENING_TOKENS tokens
            end = SENTENCE_END.search(paragraph)
            if paragraph:
                yield paragraph[:end.end()] if end else paragraph


def _fitting(prompts: Sequence[tuple[int, ...]], max_tokens: int, kind: str) -> list[tuple[int, ...]]:
    """The prompts of at most max_tokens tokens; none is an error."""
    kept = [ids for ids in prompts if len(ids) <= max_tokens]
    if not kept:
        shortest = min((len(ids) for ids in prompts), default=0)
        raise UserError(f"no {kind} prompt fits in half a sample ({max_tokens} tokens; the shortest has "
                        f"{shortest}); give a longer --seq-len")
    return kept
