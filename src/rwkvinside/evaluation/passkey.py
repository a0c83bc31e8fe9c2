"""Passkey retrieval: a 5-digit number hidden in filler text, asked for at the end.

The prompt is exactly `length` tokens: an instruction, filler, the key sentence at a depth that
moves through the filler from trial to trial, more filler, and the question. The model continues
greedily; a trial counts when the first number it writes is the key.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import torch
from torch import Tensor

from rwkvinside.errors import UserError

INSTRUCTION = ("There is important information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 12  # enough for five digits and a space in any tokenizer
GenerateFn = Callable[[Tensor], Tensor]  # prompt ids [1, T] -> continuation ids [1, ANSWER_TOKENS]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, length: int, key: int, depth: float) -> Tensor:
    """Token ids [1, length] hiding `key` at `depth` (0 = start of the filler, 1 = its end)."""
    head, needle, question = (_encode(tokenizer, t) for t in (INSTRUCTION, NEEDLE.format(key=key), QUESTION))
    room = length - len(head) - len(needle) - len(question)
    if room < 0:
        raise UserError(f"a passkey prompt of {length} tokens is too short: the instruction, key and "
                        f"question alone take {length - room}; give a longer --seq-len or --passkey-lengths")
    filler_tokens = _encode(tokenizer, FILLER)
    filler = (filler_tokens * (room // len(filler_tokens) + 1))[:room]
    split = round(depth * room)
    return torch.tensor([head + filler[:split] + needle + filler[split:] + question])


def recalled(text: str, key: int) -> bool:
    """Whether the first number in the model's continuation is the key."""
    found = re.search(r"\d+", text)
    return found is not None and found.group() == str(key)


def passkey_recall(generate: GenerateFn, tokenizer, length: int, trials: int, seed: int = 0) -> float:
    """The fraction of `trials` prompts of `length` tokens whose key the model recalls exactly."""
    rng = random.Random(seed)
    hits = 0
    for trial in range(trials):
        key = rng.randint(10000, 99999)
        prompt = passkey_prompt(tokenizer, length, key, depth=(trial + 0.5) / trials)
        continuation = generate(prompt)
        hits += recalled(tokenizer.decode(continuation[0], skip_special_tokens=True), key)
    return hits / trials
