"""`rwkvinside synth`: distil without a corpus, by sampling the teacher into training shards.

Each shard is one batch of samples: `batch_size` prompts drawn from the prompt mix
(`prompt_mix.py`), continued by the teacher (`sampler.py`) to at most `seq_len` tokens. The
output folder's format is `rwkvinside.data.synthetic`'s, which `rwkvinside distill --data DIR`
reads. Shard i depends only on the settings and i: its prompts and its sampling noise are seeded
by (seed, i), so a run interrupted and resumed writes the shards an uninterrupted one would (on the
same device). The manifest lists the finished shards and is rewritten after each, atomically: a
resumed run continues after the last shard it lists and rewrites anything beyond it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rwkvinside.config import resolve_device, resolve_dtype
from rwkvinside.data.sources import resolve_sources
from rwkvinside.data.synthetic import (FORMAT, MANIFEST, read_manifest, shard_name, vocabulary,
                                       write_manifest, write_shard)
from rwkvinside.errors import UserError
from rwkvinside.generation.chat import stop_token_ids
from rwkvinside.generation.prompt_mix import PromptPool
from rwkvinside.generation.sampler import BatchSampler
from rwkvinside.modeling.decode import DecodingPlan
from rwkvinside.modeling.loading import EMBEDDED_TEACHER, load_teacher, resolve_teacher

logger = logging.getLogger(__name__)

DEFAULT_BATCH = {"cuda": 1024, "cpu": 8}  # samples per batch (and shard) by device type


@dataclass(frozen=True)
class SynthSettings:
    """Everything that shapes the samples; a resumed output must have been made with the same."""

    teacher: str  # the embedded teacher's name, or the absolute path of a folder or GGUF file
    seq_len: int  # tokens of a sample at most, prompt included
    temperature: float  # 0: greedy
    prompts: str | None  # --prompts (document openings), a path made absolute, if given
    mix: dict[str, float]  # prompt kind -> share
    seed: int

    @classmethod
    def from_arguments(cls, teacher: str, seq_len: int, temperature: float, prompts: str | None,
                       mix: dict[str, float], seed: int) -> "SynthSettings":
        """Settings with the paths made absolute, so that a resumed run may name them differently."""
        source = teacher if teacher == EMBEDDED_TEACHER else str(resolve_teacher(teacher).resolve())
        if prompts is not None:
            resolve_sources([prompts])  # a missing path, or a file of no known kind, fails before loading
            if Path(prompts).exists():  # (not a package: path or a glob)
                prompts = str(Path(prompts).resolve())
        return cls(source, seq_len, temperature, prompts, mix, seed)


def synthesize(settings: SynthSettings, tokens: int, output: Path, batch_size: int | None = None,
               device: str = "auto") -> dict[str, Any]:
    """Sample shards into `output` until it holds at least `tokens` sampled tokens (the prompts not
    counted), continuing what an earlier run with the same settings wrote. Returns the manifest."""
    output = Path(output)
    manifest = _open_output(output, settings, tokens)
    if manifest is not None and manifest["tokens_written"] >= tokens:
        return manifest
    where = resolve_device(device)
    # bf16 on a GPU, float32 on the CPU (where bf16 matrix products are slow)
    model, tokenizer = load_teacher(settings.teacher, dtype=resolve_dtype("auto", where), device=where)
    manifest = _check_tokenizer(manifest, settings, tokenizer, output, tokens)
    stops = stop_token_ids(tokenizer)
    plan = DecodingPlan(max_new_tokens=settings.seq_len - 1, do_sample=settings.temperature > 0,
                        temperature=settings.temperature or 1.0, eos_token_ids=tuple(stops),
                        pad_token_id=stops[0])
    pool = PromptPool(tokenizer, settings.mix, settings.prompts, settings.seq_len // 2)
    sampler = BatchSampler(model, batch_size or DEFAULT_BATCH.get(where.type, DEFAULT_BATCH["cpu"]),
                           settings.seq_len, plan)
    while manifest["tokens_written"] < tokens:
        _write_next_shard(output, manifest, settings, pool, sampler, tokenizer)
    return manifest


def _open_output(output: Path, settings: SynthSettings, tokens: int) -> dict[str, Any] | None:
    """The manifest of an earlier run into `output` (None for a new output), checked against the
    settings; any other non-empty folder is refused."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder")
    if not (output / MANIFEST).is_file():
        if output.exists() and any(output.iterdir()):
            raise UserError(f"--output {output} holds files but no {MANIFEST}; give a new or empty folder, "
                            "or the folder of an earlier `rwkvinside synth` to continue it")
        return None
    manifest = read_manifest(output)
    differing = [f"{key} {manifest[key]!r} (not {value!r})" for key, value in asdict(settings).items()
                 if manifest[key] != value]
    if differing:
        raise UserError(f"{output} was sampled with other settings: {'; '.join(differing)}; continue it with "
                        "the same settings or give another --output")
    manifest["tokens_requested"] = tokens
    return manifest


def _check_tokenizer(manifest: dict[str, Any] | None, settings: SynthSettings, tokenizer, output: Path,
                     tokens: int) -> dict[str, Any]:
    """The manifest to continue, or a new one; refuses a teacher whose tokenizer changed since."""
    words = vocabulary(tokenizer)
    if manifest is None:
        output.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, **asdict(settings), "tokenizer": words, "tokens_requested": tokens,
                    "tokens_written": 0, "samples": 0, "shards": []}
        write_manifest(output, manifest)
    elif manifest["tokenizer"] != words:
        raise UserError(f"the teacher's tokenizer differs from the one {output} was sampled with; continue "
                        "it with the same teacher or give another --output")
    return manifest


def _write_next_shard(output: Path, manifest: dict[str, Any], settings: SynthSettings, pool: PromptPool,
                      sampler: BatchSampler, tokenizer) -> None:
    """Sample the next shard, write it, then list it in the manifest."""
    index = len(manifest["shards"])
    rng = np.random.default_rng([settings.seed, index])
    prompts = pool.draw(sampler.batch_size, rng)
    began = time.perf_counter()
    # The sampling noise is seeded per shard too: a resumed shard is the same shard.
    continuations = sampler.sample([prompt.ids for prompt in prompts], seed=int(rng.integers(2 ** 62)))
    seconds = time.perf_counter() - began
    samples = [list(prompt.ids) + new for prompt, new in zip(prompts, continuations)]
    sampled = sum(map(len, continuations))
    name = shard_name(index)
    write_shard(output / name, samples, tokenizer.batch_decode(samples), [prompt.kind for prompt in prompts],
                [len(prompt.ids) for prompt in prompts])
    manifest["shards"].append({"file": name, "samples": len(samples), "tokens": sampled})
    manifest["tokens_written"] += sampled
    manifest["samples"] += len(samples)
    write_manifest(output, manifest)
    logger.info("%s: %d samples, %d sampled tokens (%.0f tokens/s); %d of %d tokens written", name,
                len(samples), sampled, sampled / seconds, manifest["tokens_written"],
                manifest["tokens_requested"])
