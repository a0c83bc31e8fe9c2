"""`rwkvinside generate`, `rwkvinside chat` and `rwkvinside synth` (heavy imports wait for the handlers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rwkvinside.config import number_type
from rwkvinside.generation.prompt_mix import parse_mix

SYNTH_HELP = """\
Sample the teacher into training shards, to distil without a corpus: `rwkvinside distill --data
OUTPUT` trains on them (their token ids as they are, every token a target, prompts included).

Prompts mix three kinds (--mix): chat (the teacher's chat template around one of a few hundred
instructions shipped with rwkvinside), documents (openings of the documents in --prompts) and
free (a bare start of text). Each shard is one batch; run the command again with the same --output
to continue an interrupted run (the settings must be the same) or to add tokens (a larger --tokens).
On a GPU the teacher runs in bf16 with its one-token step replayed from a CUDA graph; on the CPU in
float32.
"""


def _add_model_options(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--model", required=True, help="a student folder, an exported folder or a run folder")
    p.add_argument("--max-new-tokens", type=number_type(int, minimum=1), default=200,
                   help="tokens to generate (per turn)")
    p.add_argument("--temperature", type=number_type(float, minimum=0.0), default=temperature,
                   help="sampling temperature; 0 decodes greedily (default: %(default)s)")
    p.add_argument("--top-p", type=number_type(float, above=0.0, maximum=1.0), default=0.95,
                   help="nucleus sampling mass when sampling, in (0, 1]")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16, fp16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the layers' work around the state updates: on an H200 a token of "
                        "SmolLM2's student takes 2.45 ms instead of 5.1 (BENCHMARKS.md); the first tokens wait "
                        "for the compilation")


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


def add_synth(commands) -> None:
    p = commands.add_parser("synth", help="sample the teacher into training shards (distil without a corpus)",
                            description=SYNTH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True,
                   help="local HF folder, .gguf file, or 'smollm2-135m' (the embedded teacher)")
    p.add_argument("--tokens", required=True, type=number_type(int, minimum=1),
                   help="sampled tokens to write (prompts not counted); reached within one batch")
    p.add_argument("--output", required=True,
                   help="the folder of shards and synth.json (new, or to go on with)")
    p.add_argument("--seq-len", type=number_type(int, minimum=16), default=512,
                   help="tokens of a sample at most, prompt included (default: %(default)s)")
    p.add_argument("--temperature", type=number_type(float, minimum=0.0), default=1.0,
                   help="sampling temperature; 0 decodes greedily (default: %(default)s)")
    p.add_argument("--prompts", help="text, JSONL or Parquet file, or a folder of them: its documents' "
                                     "openings become prompts")
    p.add_argument("--mix", type=parse_mix, metavar="KIND=SHARE,...",
                   help="shares of the prompt kinds chat, documents, free (default: chat=0.5,documents=0.25,"
                        "free=0.25; without --prompts chat=2/3,free=1/3)")
    p.add_argument("--batch-size", type=number_type(int, minimum=1),
                   help="samples per batch and shard (default: 1024 on a GPU, 8 on the CPU)")
    p.add_argument("--seed", type=number_type(int, minimum=0), default=0, help="seeds prompts and sampling")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1, ...")
    p.set_defaults(handler=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from rwkvinside.generation.prompt_mix import resolve_mix
    from rwkvinside.generation.synth import SynthSettings, synthesize

    settings = SynthSettings.from_arguments(args.teacher, args.seq_len, args.temperature, args.prompts,
                                            resolve_mix(args.mix, args.prompts is not None), args.seed)
    finished = _tokens_written(Path(args.output)) >= args.tokens
    manifest = synthesize(settings, args.tokens, Path(args.output), args.batch_size, args.device)
    shards = f"{manifest['tokens_written']:,} sampled tokens in {len(manifest['shards'])} shards"
    if finished:
        print(f"{args.output} is finished already: {shards} (--tokens {args.tokens:,})")
    else:
        print(f"{args.output}: {shards}; train on it with `rwkvinside distill --data {args.output}`")
    return 0


def _tokens_written(output: Path) -> int:
    """The sampled tokens an earlier run left in `output`."""
    from rwkvinside.data.synthetic import MANIFEST, read_manifest

    return read_manifest(output)["tokens_written"] if (output / MANIFEST).is_file() else 0


def _load(args: argparse.Namespace):
    from rwkvinside.generation.chat import sampling_options
    from rwkvinside.generation.loading import load_model

    model, tokenizer, _ = load_model(args.model, args.device, args.dtype)
    if args.compile:
        model.compile_layers()
    options = sampling_options(tokenizer, args.max_new_tokens, args.temperature, args.top_p,
                               getattr(args, "stop", ()))
    return model, tokenizer, options


def run_generate(args: argparse.Namespace) -> int:
    from rwkvinside.generation.chat import generate_text

    model, tokenizer, options = _load(args)
    print(args.prompt + generate_text(model, tokenizer, args.prompt, **options))
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from rwkvinside.errors import UserError
    from rwkvinside.generation import chat

    model, tokenizer, options = _load(args)
    if tokenizer.chat_template is None:
        raise UserError(f"the tokenizer in '{args.model}' has no chat template; use `rwkvinside generate`")
    chat.run_chat(chat.ChatSession(model, tokenizer, options, args.system), sys.stdin, sys.stdout)
    return 0
