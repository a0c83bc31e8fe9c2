"""Text in, text out: one-shot generation and a chat that keeps the recurrent state between turns.

A chat turn renders the whole conversation with the tokenizer's chat template, but feeds the
model only the text added since the last turn: the state (and the kept attention layers' caches)
already hold the rest. transformers' `generate` gets the full token history with the cache and
itself skips the tokens the cache has read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, TextIO

import torch

from rwkvinside.generation.loading import warn_if_longer_than_seen
from rwkvinside.data import pad_id
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.state import CACHE_KEYWORD

logger = logging.getLogger(__name__)

# Tokens that end a turn in common chat templates, besides the tokenizer's own EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_token_ids(tokenizer) -> list[int]:
    """The EOS token and whichever end-of-turn tokens the vocabulary has."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + [vocab[token] for token in END_OF_TURN if token in vocab and vocab[token] not in ids]


def sampling_options(tokenizer, max_new_tokens: int, temperature: float, top_p: float,
                     stop: Iterable[str] = ()) -> dict[str, Any]:
    """Keyword arguments for `generate`: greedy at temperature 0, else sampling."""
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_token_ids(tokenizer),
        "pad_token_id": pad_id(tokenizer),
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p)
    if stop:
        options.update(stop_strings=list(stop), tokenizer=tokenizer)
    return options


@torch.no_grad()
def generate_text(model: RWKVInsideForCausalLM, tokenizer, prompt: str, **options: Any) -> str:
    """The continuation of `prompt` (options: `sampling_options`)."""
    device = model.lm_head.weight.device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    warn_if_longer_than_seen(ids.shape[1] + options["max_new_tokens"], model)
    output = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


class ChatSession:
    """A conversation with a model whose state carries over from turn to turn."""

    def __init__(self, model: RWKVInsideForCausalLM, tokenizer, options: dict[str, Any], system: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cache = model.new_cache()
        device = model.lm_head.weight.device
        self.ids = torch.zeros(1, 0, dtype=torch.long, device=device)  # every token so far: [1, T]
        self.text = ""  # the conversation as the model has read and written it

    @torch.no_grad()
    def reply(self, user: str) -> str:
        """Add the user's message, generate the assistant's answer from the carried state."""
        self.messages.append({"role": "user", "content": user})
        rendered = self.tokenizer.apply_chat_template(self.messages, tokenize=False,
                                                      add_generation_prompt=True)
        if not rendered.startswith(self.text):
            # The template renders the past differently from how it was generated: read it all again.
            logger.warning("the chat template changed earlier turns; re-reading the whole conversation")
            self.cache, self.ids, self.text = self.model.new_cache(), self.ids[:, :0], ""
        new = self.tokenizer(rendered[len(self.text):], add_special_tokens=False,
                             return_tensors="pt")["input_ids"]
        ids = torch.cat([self.ids, new.to(self.ids.device)], dim=1)
        warn_if_longer_than_seen(ids.shape[1] + self.options["max_new_tokens"], self.model)
        output = self.model.generate(ids, attention_mask=torch.ones_like(ids), **{CACHE_KEYWORD: self.cache},
                                     **self.options)
        answer = output[0, ids.shape[1]:]
        self.ids = output
        self.text = rendered + self.tokenizer.decode(answer, skip_special_tokens=False)
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        return text


def run_chat(session: ChatSession, lines: TextIO, out: TextIO) -> None:
    """Read user turns line by line until end of input (or /exit), answering each."""
    out.write("Chat with the student; /exit or end of input (Ctrl-D) quits.\n")
    while True:
        out.write("> ")
        out.flush()
        line = lines.readline()
        if not line or line.strip() == "/exit":
            out.write("\n")
            return
        if line.strip():
            out.write(session.reply(line.strip()) + "\n")
