"""Sampling speed of `rwkvinside synth` on one GPU, beside the teacher's own forward throughput.

    python benchmarks/bench_synth.py --teacher /tmp/t/smollm2.gguf --out $OUT    # the H200 run, ~3 minutes
    python benchmarks/bench_synth.py --teacher random --tokenizer DIR             # no weights needed
    python benchmarks/bench_synth.py --dry-run                                    # tiny, on the CPU

For each batch size, `BatchSampler` (what synth runs) continues prompts from synth's default mix
(chat 2/3, free 1/3) by 256 new tokens at most (`--new-tokens`: the cache holds the longest prompt
plus that; `--seq-len L` instead samples as `synth --seq-len L` does: prompts of up to L/2 tokens,
each sample run on to L tokens, prompt included), batch after batch until --tokens are sampled,
after one untimed batch (the CUDA graph's capture). "sampled" counts the tokens kept (up to each
row's end of text), "slots" every row at every step (rows that ended keep stepping until all have,
or the step budget is spent). A random teacher (SmolLM2-135M's shape) rarely ends a row, so its
sampled tokens are its slots. Shard writing (decoding the ids to text, Parquet) is timed apart, once
per batch size. The teacher's forward throughput is a no-grad forward of --forward-batch x 2048
tokens, logits included, as distillation runs it. `--attention kernel torch` times each batch size
twice, the decoding steps' attention through the Triton kernel (what synth runs on CUDA) and through
the two matrix products it replaced (`rwkvinside.ops.decode_attention`), side by side.

Writes bench_synth.json to --out (default $OUT, else ./bench_out) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rwkvinside.data.synthetic import write_shard
from rwkvinside.generation.chat import stop_token_ids
from rwkvinside.generation.prompt_mix import PromptPool, resolve_mix
from rwkvinside.generation.sampler import BatchSampler
from rwkvinside.modeling.decode import DecodingPlan
from rwkvinside.modeling.loading import embedded_teacher_path, load_teacher

logger = logging.getLogger("bench_synth")
decode_attention = importlib.import_module("rwkvinside.ops.decode_attention")

FORWARD_TOKENS = 2048  # tokens per row of the forward-throughput measurement
# SmolLM2-135M's architecture, for `--teacher random`, and a tiny one for --dry-run.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "max_position_embeddings": 8192, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m",
                   help="a .gguf file, an HF folder, 'smollm2-135m', or 'random' (SmolLM2-135M's shape)")
    p.add_argument("--tokenizer", help="for a random teacher: an HF tokenizer folder (default: the embedded "
                                       "teacher's)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens per sample at most")
    p.add_argument("--seq-len", type=int,
                   help="sample as `synth --seq-len` does: samples of this many tokens, prompt included "
                        "(replaces --new-tokens)")
    p.add_argument("--tokens", type=int, default=2_000_000,
                   help="sampled tokens to time per batch size (about)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--attention", nargs="+", choices=("kernel", "torch"), default=["kernel"],
                   help="the decoding steps' attention: the Triton kernel (CUDA's default) and/or the torch path")
    p.add_argument("--forward-batch", type=int, default=16,
                   help="rows of 2048 tokens in the forward measurement")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="output folder")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, float32, a tiny random Llama with the embedded teacher's tokenizer, batches 2 "
                        "and 4, 16 new tokens, one forward row of 128 tokens")
    args = p.parse_args()
    if args.dry_run:
        args.batch_sizes, args.new_tokens, args.tokens, args.forward_batch = [2, 4], 16, 64, 1
    return args


def build_teacher(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Any]:
    """(model, tokenizer): the --teacher in bf16 on the GPU; a random one of SmolLM2-135M's shape (a tiny
    one for --dry-run, in float32) with --tokenizer or the embedded teacher's tokenizer."""
    if not args.dry_run and args.teacher != "random":
        return load_teacher(args.teacher, dtype=torch.bfloat16, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        path = embedded_teacher_path()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **(TINY if args.dry_run else SMOLLM2))
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval(), tokenizer


@contextlib.contextmanager
def torch_attention_only(active: bool):
    """While active, the decoding attention takes its torch path on CUDA too (the baseline row)."""
    kernel_allowed = decode_attention.triton_available
    if active:
        decode_attention.triton_available = lambda: False
    try:
        yield
    finally:
        decode_attention.triton_available = kernel_allowed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampling(model: nn.Module, tokenizer, pool: PromptPool, batch: int, args: argparse.Namespace,
             device: torch.device) -> dict[str, Any]:
    """Sampled tokens/s of BatchSampler at one batch size."""
    stops = stop_token_ids(tokenizer)
    plan = DecodingPlan(max_new_tokens=0, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                        eos_token_ids=tuple(stops), pad_token_id=stops[0])
    longest = max(len(ids) for prompts in pool.pools.values() for ids in prompts)
    cache_slots = args.seq_len or longest + args.new_tokens
    sampler = BatchSampler(model, batch, cache_slots, plan)
    rng = np.random.default_rng(batch)
    prompts = [prompt.ids for prompt in pool.draw(batch, rng)]
    sampler.sample(prompts)  # untimed: allocation, and on a GPU the graph's capture
    sampled = slots = 0
    seconds = 0.0
    while sampled < args.tokens:
        prompts = [prompt.ids for prompt in pool.draw(batch, rng)]
        _sync(device)
        start = time.perf_counter()
        continuations = sampler.sample(prompts)
        _sync(device)
        seconds += time.perf_counter() - start
        sampled += sum(map(len, continuations))
        slots += batch * max(map(len, continuations))
    start = time.perf_counter()
    samples = [list(prompt) + new for prompt, new in zip(prompts, continuations)]
    with tempfile.TemporaryDirectory() as folder:
        write_shard(Path(folder) / "shard.parquet", samples, tokenizer.batch_decode(samples), ["x"] * batch,
                    [len(prompt) for prompt in prompts])
    write_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del sampler
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"batch": batch, "cache_slots": cache_slots, "sampled_tokens": sampled,
            "seconds": seconds, "sampled_tokens_per_s": sampled / seconds, "slots_per_s": slots / seconds,
            "shard_write_s": write_seconds, "peak_gb": peak}


@torch.no_grad()
def forward_throughput(model: nn.Module, rows: int, length: int, device: torch.device) -> dict[str, Any]:
    """Tokens/s of a no-grad forward over rows x length random tokens (best of 3 after a warm-up)."""
    ids = torch.randint(0, model.config.vocab_size, (rows, length), device=device)
    best = float("inf")
    for attempt in range(4):
        _sync(device)
        start = time.perf_counter()
        model(ids)
        _sync(device)
        if attempt:  # the first run warms up
            best = min(best, time.perf_counter() - start)
    return {"rows": rows, "tokens_per_row": length, "tokens_per_s": rows * length / best}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    model, tokenizer = build_teacher(args, device)
    pool = PromptPool(tokenizer, resolve_mix(None, have_documents=False), None,
                      max_tokens=args.seq_len // 2 if args.seq_len else 256)
    results: dict[str, Any] = {"teacher": "tiny random" if args.dry_run else args.teacher,
                               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                               "cpu",
                               "torch": torch.__version__, "new_tokens": args.new_tokens,
                               "seq_len": args.seq_len,
                               "temperature": args.temperature, "sampling": []}
    for batch in args.batch_sizes:
        for attention in args.attention:
            with torch_attention_only(attention == "torch"):
                results["sampling"].append({"attention": attention,
                                            **sampling(model, tokenizer, pool, batch, args, device)})
            logger.info("%s", results["sampling"][-1])
    length = 128 if args.dry_run else FORWARD_TOKENS
    results["forward"] = forward_throughput(model, args.forward_batch, length, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_synth.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
