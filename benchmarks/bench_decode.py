"""Decoding speed on one GPU: an RWKV-7 student (recurrent state) against its teacher (KV cache).

    python benchmarks/bench_decode.py --teacher /tmp/t/smollm2.gguf          # the H100 run, < 5 minutes
    python benchmarks/bench_decode.py --teacher random --cuda-graph         # no weights needed; + CUDA graph
    python benchmarks/bench_decode.py --dry-run                              # a tiny version on the CPU

The student is the teacher converted with randomly initialised RWKV-7 time mixers in every layer
(`--keep-attention` keeps some): timing does not depend on training. For each context length and
batch size, both models run `generate` on random prompts: the teacher transformers' own, with its
DynamicCache (StaticCache with --teacher-static); the student its own decoding loop
(`modeling.decode`) with its RecurrentCache, whose single-token steps go to fla's
`fused_recurrent_rwkv7`, replayed from a CUDA graph on a GPU (a hybrid's kept attention layers
decode from fixed key/value buffers, so its step is captured too).
ms/token is (t(N + steps) - t(N)) / steps over greedy runs of N and N + steps new tokens, so the
prefill cancels out; each configuration runs once first to warm up (kernel compilation,
autotuning, a static cache at its final size), then each run length --repeats times, the fastest counted: a long prefill's time
varies between runs, and a single pair of runs puts the difference into the per-token figure (the
likeliest reason `generate` measured 0.19 ms above its own replayed step at 16k, and 0.02 at 4k,
over 256 steps on an H200). Peak memory is the CUDA allocator's peak during the longer run,
prefill included (at long contexts the prefill's activations set it); "cache" is the size of the
KV cache or recurrent state the run ends with, what decoding carries. `--cuda-graph` also times
the student's decode step captured in a CUDA graph (replayed, no Python between steps), which
shows how much of a step is launch overhead; it needs an all-RWKV student (it carries only
recurrent states).

Writes bench_decode.json and bench_decode.md to --out (default $OUT, else ./bench_out) and prints
the table last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rwkvinside.modeling.convert import ConversionSpec, convert
from rwkvinside.modeling.decode import capture
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.loading import load_teacher
from rwkvinside.modeling.state import CACHE_KEYWORD, RecurrentLayer

logger = logging.getLogger("bench_decode")

FIRST_TOKENS = 4  # the shorter of the two runs; its prefill and first steps cancel out
# SmolLM2-135M's architecture, for `--teacher random` (and `--dry-run`'s tiny variant of it).
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}
TINY = {**SMOLLM2, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="'smollm2-135m' (the embedded teacher, the default), a .gguf file, "
                                     "an HF folder, or 'random' (SmolLM2-135M's shape, random weights)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768], help="prompt lengths")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes")
    p.add_argument("--steps", type=int, default=32, help="timed decoding steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each length timed; the fastest counts")
    p.add_argument("--keep-attention", type=int, nargs="*", default=[], metavar="LAYER",
                   help="layers the student keeps as softmax attention (default: none)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time the student's bare step replayed as a CUDA graph, outside `generate`")
    p.add_argument("--compile", action="store_true",
                   help="also time a student whose time mixers are compiled (compile_layers)")
    p.add_argument("--student-context", type=int, default=0,
                   help="prompt the student with only the last N tokens (its cost per token does not depend on "
                        "the context: its state has one size; this skips its long prefills)")
    p.add_argument("--teacher-static", action="store_true",
                   help="the teacher decodes with transformers' static cache (its fastest standard path)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="output folder")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, fp32, contexts 64 and 128, batches 1 and 2, 4 steps; a tiny random teacher "
                        "unless --teacher is given")
    args = p.parse_args()
    if args.dry_run:
        args.contexts, args.batches, args.steps, args.dtype = [64, 128], [1, 2], 4, "fp32"
    return args


def build_teacher(source: str | None, dry_run: bool, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The --teacher; without one, the embedded teacher (a tiny random one for --dry-run)."""
    if source is None and not dry_run:
        source = "smollm2-135m"
    if source is not None and source != "random":
        teacher, _ = load_teacher(source, dtype=dtype, device=device)
        return teacher
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **(TINY if source is None else SMOLLM2))
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def cache_megabytes(cache) -> float:
    """The bytes a generation cache holds: keys/values, or recurrent states."""
    tensors = []
    for layer in cache.layers:
        if isinstance(layer, RecurrentLayer):
            tensors += [layer.state.shift, layer.state.wkv] if layer.state is not None else []
        elif getattr(layer, "keys", None) is not None:
            tensors += [layer.keys, layer.values]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                  **options: Any) -> tuple[float, float | None, Any]:
    """(seconds, peak GB or None on the CPU, final cache) of one greedy `generate` of exactly new_tokens."""
    device = prompt.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, use_cache=True, pad_token_id=0, **options)
    start = time.perf_counter()
    if isinstance(model, RWKVInsideForCausalLM):
        # The student's own loop (its step replayed from a CUDA graph on a GPU) fills the cache it is
        # given; return_dict_in_generate is an option it leaves to transformers' eager loop.
        cache = model.new_cache()
        model.generate(prompt, **{CACHE_KEYWORD: cache}, **settings)
    else:
        cache = getattr(model.generate(prompt, return_dict_in_generate=True, **settings), CACHE_KEYWORD)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak, cache


def measure(model: nn.Module, prompt: torch.Tensor, steps: int, repeats: int, **options: Any
            ) -> dict[str, float | None]:
    """ms per decoded token (prefill cancelled out), peak memory and cache size at this prompt shape."""
    # Warm-up at the longer run's length: compilation and autotuning for these shapes, and a static
    # cache at its final size (transformers keeps the largest so far, so the shorter runs reuse it).
    time_generate(model, prompt, FIRST_TOKENS + steps, **options)
    short = min(time_generate(model, prompt, FIRST_TOKENS, **options)[0] for _ in range(repeats))
    runs = [time_generate(model, prompt, FIRST_TOKENS + steps, **options) for _ in range(repeats)]
    long, peak, cache = min(runs, key=lambda run: run[0])
    return {"ms_per_token": 1e3 * (long - short) / steps, "peak_gb": peak, "cache_mb": cache_megabytes(cache),
            "prefill_s": short}


@torch.no_grad()
def graphed_step_ms(student: RWKVInsideForCausalLM, prompt: torch.Tensor, steps: int) -> float:
    """ms per decoding step with the student's step captured in a CUDA graph.

    The step reads the states from fixed buffers and copies its new states back into them, so that
    replaying the graph decodes one token after another with no Python in between.
    """
    cache = student.new_cache()
    logits = student(prompt, use_cache=True, **{CACHE_KEYWORD: cache}).logits  # prefill
    token = logits[:, -1:].argmax(-1)
    buffers = {i: cache.layers[i].state for i in cache.rwkv_layers}

    def step() -> None:
        logits = student(token, use_cache=True, **{CACHE_KEYWORD: cache}).logits
        for i, buffer in buffers.items():
            new = cache.layers[i].state
            buffer.shift.copy_(new.shift)
            buffer.wkv.copy_(new.wkv)
            cache.layers[i].state = buffer
        token.copy_(logits[:, -1:].argmax(-1))

    graph = capture(step)  # the decoding loop's own capture
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / steps


def run_config(teacher: nn.Module, student: RWKVInsideForCausalLM, compiled: RWKVInsideForCausalLM | None,
               context: int, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(context + batch)
    prompt = torch.randint(1, teacher.config.vocab_size, (batch, context), generator=generator).to(device)
    row: dict[str, Any] = {"context": context, "batch": batch}
    teacher_options = {"cache_implementation": "static"} if args.teacher_static else {}
    student_prompt = prompt[:, -args.student_context:] if args.student_context else prompt
    models = [("teacher", teacher, teacher_options, prompt), ("student", student, {}, student_prompt)]
    models += [("student_compiled", compiled, {}, student_prompt)] if compiled is not None else []
    for name, model, options, ids in models:
        try:
            row[name] = measure(model, ids, args.steps, args.repeats, **options)
        except torch.cuda.OutOfMemoryError:
            logger.warning("%s: out of memory at context %d, batch %d", name, context, batch)
            row[name] = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.cuda_graph:
        row["student_graph_ms_per_token"] = graphed_step_ms(student, prompt, args.steps)
        if compiled is not None:
            row["student_compiled_graph_ms_per_token"] = graphed_step_ms(compiled, prompt, args.steps)
    logger.info("context %d, batch %d: %s", context, batch, row)
    return row


def _cell(result: dict | None, key: str, spec: str) -> str:
    if result is None:
        return "OOM"
    return "-" if result.get(key) is None else format(result[key], spec)


def markdown(rows: list[dict[str, Any]], header: str, graph: bool, compiled: bool) -> str:
    columns = ["context", "batch", "teacher ms/token", "student ms/token"]
    columns += ["student compiled ms/token"] if compiled else []
    columns += ["student, CUDA graph"] if graph else []
    columns += ["student compiled, CUDA graph"] if graph and compiled else []
    columns += ["speed-up", "teacher peak GB", "student peak GB", "teacher KV cache MB", "student state MB"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        teacher, student = row["teacher"], row["student"]
        speedup = (f"{teacher['ms_per_token'] / student['ms_per_token']:.2f}x"
                   if teacher is not None and student is not None else "-")
        cells = [str(row["context"]), str(row["batch"]), _cell(teacher, "ms_per_token", ".2f"),
                 _cell(student, "ms_per_token", ".2f")]
        cells += [_cell(row["student_compiled"], "ms_per_token", ".2f")] if compiled else []
        cells += [f"{row['student_graph_ms_per_token']:.2f}"] if graph else []
        cells += [f"{row['student_compiled_graph_ms_per_token']:.2f}"] if graph and compiled else []
        cells += [speedup, _cell(teacher, "peak_gb", ".2f"), _cell(student, "peak_gb", ".2f"),
                  _cell(teacher, "cache_mb", ".1f"), _cell(student, "cache_mb", ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph needs a GPU")
    if args.cuda_graph and args.keep_attention:
        raise SystemExit("--cuda-graph needs an all-RWKV student (kept layers' KV caches grow every step)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    teacher = build_teacher(args.teacher, args.dry_run, dtype, device)
    teacher.config.use_cache = True
    layers = [i for i in range(teacher.config.num_hidden_layers) if i not in set(args.keep_attention)]
    spec = ConversionSpec(layers=tuple(layers), init="rwkv")
    student = convert(teacher, spec)
    student.eval()
    compiled = None
    if args.compile:
        compiled = convert(teacher, spec).eval()
        compiled.compile_layers()

    with torch.no_grad():
        # Once before any timing: the first generate of a process pays one-off costs (allocator, clocks).
        warm_up = torch.ones(1, 16, dtype=torch.long, device=device)
        for model in (teacher, student, compiled):
            if model is not None:
                time_generate(model, warm_up, FIRST_TOKENS + args.steps)
        # Shortest context first, every batch size at each: transformers sizes a static cache by the
        # longest `generate` so far (to avoid recompiling), so a context timed after a longer one
        # would attend over the longer one's cache.
        rows = [run_config(teacher, student, compiled, context, batch, args, device)
                for context in sorted(args.contexts) for batch in args.batches]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    source = args.teacher or teacher.name_or_path or "random"
    header = (f"Decoding, {args.dtype}, on {name}: teacher `{source}` ({teacher.config.num_hidden_layers} "
              f"layers) with its KV cache; student with {len(layers)} RWKV-7 layers, recurrent state. "
              f"ms/token over {args.steps} steps after the prompt.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results = {"device": name, "settings": settings, "rows": rows}
    (out / "bench_decode.json").write_text(json.dumps(results, indent=2))
    table = markdown(rows, header, args.cuda_graph, args.compile)
    (out / "bench_decode.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
