"""DeepSpeed on GPUs against one GPU: the same three stages, the same global batch, the same losses.

A random teacher of SmolLM2's attention shape (width 576, 9 heads of 64, 2 layers; the tests'
tiny tokenizer) is distilled through the CLI twice: once by the plain engine on one GPU with batch
B, once by DeepSpeed on G GPUs with batch B / G each. The per-step losses of both are printed
side by side (bf16, so they agree to about 1e-2, not to the last bit).

    python benchmarks/deepspeed_gpu_check.py --gpus 2 --zero-stage 3     # writes to --out, else $OUT
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tests_conftest():
    spec = importlib.util.spec_from_file_location("rwkvinside_tests_root", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_inputs(folder: Path) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    fixtures = tests_conftest()
    tokenizer = fixtures.build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    teacher = folder / "teacher"
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(fixtures.TRAINING_TEXT * 60), encoding="utf-8")
    chat = folder / "chat.jsonl"
    turns = [("Who wrote Hamlet?", "Shakespeare did."), ("Count to three.", "One, two, three."),
             ("Say hello.", "Hello!"), ("The quick brown fox?", "Jumps over the lazy dog.")]
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in turns * 8), encoding="utf-8")
    return {"teacher": teacher, "corpus": corpus, "chat": chat}


def distill(inputs: dict[str, Path], output: Path, gpus: int, batch: int, steps: int, extra: list[str]) -> float:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)] if gpus > 1 else []
    command = [sys.executable, *launcher, "-m", "rwkvinside.cli", "-q", "distill", "--teacher", str(inputs["teacher"]),
               "--data", str(inputs["corpus"]), "--seq-len", "256", "--batch-size", str(batch),
               "--max-steps", str(steps), "--output", str(output), "--overwrite",
               f"data.chat=['{inputs['chat']}']", "data.eval=[]", "log.progress=false", *extra]
    print(" ".join(command), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True)
    return time.monotonic() - started


def losses(output: Path, stage: int) -> list[float]:
    lines = (output / f"stage{stage}" / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(args.out / "inputs")
    plain_s = distill(inputs, args.out / "plain", 1, args.batch_size, args.steps, [])
    deepspeed_s = distill(inputs, args.out / "deepspeed", args.gpus, args.batch_size // args.gpus, args.steps,
                          ["engine.kind=deepspeed", f"engine.zero_stage={args.zero_stage}"])
    rows = []
    for stage in (1, 2, 3):
        for step, (plain, deepspeed) in enumerate(zip(losses(args.out / "plain", stage),
                                                      losses(args.out / "deepspeed", stage)), start=1):
            rows.append({"stage": stage, "step": step, "plain": plain, "deepspeed": deepspeed,
                         "relative_difference": abs(deepspeed - plain) / abs(plain)})
    result = {"gpus": args.gpus, "zero_stage": args.zero_stage, "global_batch": args.batch_size,
              "plain_wall_s": plain_s, "deepspeed_wall_s": deepspeed_s, "steps": rows}
    (args.out / "deepspeed_check.json").write_text(json.dumps(result, indent=2))
    print(f"| stage | step | 1 GPU, plain | {args.gpus} GPUs, ZeRO-{args.zero_stage} | relative difference |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['stage']} | {row['step']} | {row['plain']:.5g} | {row['deepspeed']:.5g} | "
              f"{row['relative_difference']:.1e} |")


if __name__ == "__main__":
    main()
