"""`rwkvinside generate` and `rwkvinside chat` (heavy imports wait for the handlers)."""

from __future__ import annotations

import argparse
import sys


def _add_model_options(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--model", required=True, help="a student checkpoint folder or an exported folder")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (per turn)")
    p.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature; 0 decodes greedily (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass when sampling")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16, fp16")


def add_generate(commands) -> None:
    p = commands.add_parser("generate", help="continue a prompt with a student",
                            description="Continue --prompt with a student, carrying its recurrent state.")
    _add_model_options(p, temperature=0.0)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop at this text (repeatable)")
    p.set_defaults(handler=run_generate)


def add_chat(commands) -> None:
    p = commands.add_parser("chat", help="talk with a student; its state carries over between turns",
                            description="An interactive chat; each turn feeds the model only its own "
                                        "tokens.")
    _add_model_options(p, temperature=0.7)
    p.add_argument("--system", help="a system message to start the conversation with")
    p.set_defaults(handler=run_chat)


def _load(args: argparse.Namespace):
    from rwkvinside.generation.chat import sampling_options
    from rwkvinside.generation.loading import load_model

    model, tokenizer, metadata = load_model(args.model, args.device, args.dtype)
    options = sampling_options(tokenizer, args.max_new_tokens, args.temperature, args.top_p,
                               getattr(args, "stop", ()))
    return model, tokenizer, metadata, options


def run_generate(args: argparse.Namespace) -> int:
    from rwkvinside.generation.chat import generate_text

    model, tokenizer, metadata, options = _load(args)
    print(args.prompt + generate_text(model, tokenizer, metadata, args.prompt, **options))
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from rwkvinside.errors import UserError
    from rwkvinside.generation import chat

    model, tokenizer, metadata, options = _load(args)
    if tokenizer.chat_template is None:
        raise UserError(f"the tokenizer in '{args.model}' has no chat template; use `rwkvinside generate`")
    chat.run_chat(chat.ChatSession(model, tokenizer, metadata, options, args.system), sys.stdin, sys.stdout)
    return 0
