"""`rwkvinside synth` on a tiny random Llama teacher: shards and manifest, the prompt mix, resuming,
refusals, greedy sampling equal to the teacher's own `generate`, and distillation on the shards.
The CUDA-graph replay of the sampling step is checked against the eager loop on a GPU."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet
import pytest
import torch

from rwkvinside import cli
from rwkvinside.data.synthetic import MANIFEST, shard_name
from rwkvinside.distill.metrics import read_log
from rwkvinside.generation import sampler as sampler_module
from rwkvinside.generation import synth
from rwkvinside.generation.prompt_mix import PromptPool, instructions, parse_mix
from rwkvinside.generation.sampler import BatchSampler
from rwkvinside.modeling.decode import DecodingPlan

TOKENS, SEQ_LEN, BATCH = 600, 80, 4
MIX = "chat=0.4,documents=0.3,free=0.3"
PARAGRAPHS = ["The quick brown fox jumps over the lazy dog. It was not amused.",
              "To be, or not to be, that is the question. Whether tis nobler in the mind.",
              "Once upon a time, there was a little girl who loved to read. She read every day."]


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, build_teacher, tiny_tokenizer) -> Path:
    """A random 2-layer Llama and the tiny tokenizer (ChatML template) as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("teacher")
    build_teacher("llama", num_layers=2).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
    return path


def synth_args(teacher: Path, output: Path, corpus: Path, *extra: str, tokens: int = TOKENS) -> list[str]:
    return ["-q", "synth", "--teacher", str(teacher), "--tokens", str(tokens), "--output", str(output),
            "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--prompts", str(corpus), "--mix", MIX,
            "--device", "cpu", *extra]  # float32 on the CPU: compared with the teacher's own generate below


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_folder, corpus) -> Path:
    """One uninterrupted run."""
    output = tmp_path_factory.mktemp("synth") / "out"
    assert cli.main(synth_args(teacher_folder, output, corpus)) == 0
    return output


def manifest_of(output: Path) -> dict:
    return json.loads((output / MANIFEST).read_text(encoding="utf-8"))


def rows(output: Path) -> list[dict]:
    return [row for shard in manifest_of(output)["shards"]
            for row in pyarrow.parquet.read_table(output / shard["file"]).to_pylist()]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rwkvinside: error:") and "Traceback" not in err, err
    return err


# ---- the output -----------------------------------------------------------------------------------

def test_shards_and_manifest_hold_the_tokens_asked_for(finished, teacher_folder, corpus, tiny_tokenizer):
    manifest = manifest_of(finished)
    shards = manifest["shards"]
    assert sorted(p.name for p in finished.iterdir()) == sorted([MANIFEST] + [s["file"] for s in shards])
    assert [s["file"] for s in shards] == [shard_name(i) for i in range(len(shards))]
    written = sum(s["tokens"] for s in shards)
    assert manifest["tokens_written"] == written and written - shards[-1]["tokens"] < TOKENS <= written
    assert manifest["samples"] == BATCH * len(shards) == len(rows(finished))
    assert manifest["teacher"] == str(teacher_folder.resolve())
    assert manifest["prompts"] == str(corpus.resolve())
    assert (manifest["seq_len"], manifest["temperature"], manifest["seed"]) == (SEQ_LEN, 1.0, 0)
    assert manifest["mix"] == parse_mix(MIX) and manifest["tokens_requested"] == TOKENS
    assert manifest["tokenizer"]["vocab_size"] == len(tiny_tokenizer.get_vocab())


def test_rows_decode_to_their_text_and_hold_prompt_and_continuation(finished, tiny_tokenizer):
    stops = {tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")}
    sampled = 0
    for row in rows(finished):
        ids = row["ids"]
        assert tiny_tokenizer.decode(ids) == row["text"]
        assert 0 < row["prompt_tokens"] < len(ids) <= SEQ_LEN
        continuation = ids[row["prompt_tokens"]:]
        assert not stops & set(continuation[:-1])  # a row ends at its first stop token
        sampled += len(continuation)
    assert sampled == manifest_of(finished)["tokens_written"]


def test_every_kind_of_prompt_is_in_the_mix(finished, tiny_tokenizer):
    prompts = {}
    for row in rows(finished):
        prompts.setdefault(row["kind"], []).append(tiny_tokenizer.decode(row["ids"][:row["prompt_tokens"]]))
    assert set(prompts) == {"chat", "documents", "free"}
    assert set(prompts["chat"]) <= {f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
                                    for instruction in instructions()}
    openings = {"<|endoftext|>The quick brown fox jumps over the lazy dog.",
                "<|endoftext|>To be, or not to be, that is the question.",
                "<|endoftext|>Once upon a time, there was a little girl who loved to read."}
    assert set(prompts["documents"]) <= openings
    assert set(prompts["free"]) == {"<|endoftext|>"}


def test_the_instructions_are_many_and_distinct():
    lines = instructions()
    assert len(lines) >= 300 and len(set(lines)) == len(lines)


def test_a_pool_draws_kinds_by_their_shares(tiny_tokenizer, corpus):
    pool = PromptPool(tiny_tokenizer, parse_mix("chat=0.6,documents=0.3,free=0.1"), str(corpus), 40)
    kinds = [prompt.kind for prompt in pool.draw(4000, np.random.default_rng(0))]
    assert abs(kinds.count("chat") / 4000 - 0.6) < 0.03 and abs(kinds.count("free") / 4000 - 0.1) < 0.02
    assert all(len(prompt.ids) <= 40 for prompt in pool.draw(100, np.random.default_rng(1)))


# ---- resuming and refusing ------------------------------------------------------------------------

def test_an_interrupted_run_resumes_to_the_uninterrupted_output(finished, teacher_folder, corpus, tmp_path,
                                                                monkeypatch, capsys):
    """Stopped after its third shard was written but before the manifest listed it: the resumed run
    writes that shard again (not twice) and ends with the shards of the uninterrupted run."""
    output = tmp_path / "out"
    write_manifest, calls = synth.write_manifest, []

    def interrupted(folder, manifest):
        calls.append(len(manifest["shards"]))
        if len(manifest["shards"]) == 3:
            raise KeyboardInterrupt
        write_manifest(folder, manifest)

    monkeypatch.setattr(synth, "write_manifest", interrupted)
    assert cli.main(synth_args(teacher_folder, output, corpus)) == 130
    assert calls == [0, 1, 2, 3] and len(manifest_of(output)["shards"]) == 2
    assert (output / shard_name(2)).is_file()  # written, but not listed: never read
    monkeypatch.setattr(synth, "write_manifest", write_manifest)
    assert cli.main(synth_args(teacher_folder, output, corpus)) == 0
    assert manifest_of(output) == manifest_of(finished)
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in finished.iterdir())
    assert rows(output) == rows(finished)
    capsys.readouterr()


def test_a_finished_output_is_reported_as_such(finished, teacher_folder, corpus, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    assert cli.main(synth_args(teacher_folder, finished, corpus, tokens=TOKENS // 2)) == 0
    assert "is finished already" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == before


def test_more_tokens_continue_a_finished_output(finished, teacher_folder, corpus, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(finished, output)
    more = manifest_of(finished)["tokens_written"] + 1
    assert cli.main(synth_args(teacher_folder, output, corpus, tokens=more)) == 0
    manifest = manifest_of(output)
    assert len(manifest["shards"]) == len(manifest_of(finished)["shards"]) + 1
    assert manifest["tokens_requested"] == more and rows(output)[:len(rows(finished))] == rows(finished)
    capsys.readouterr()


@pytest.mark.parametrize("change, named", [
    (["--seq-len", "64"], "seq_len 80 (not 64)"),
    (["--temperature", "0.5"], "temperature 1.0 (not 0.5)"),
    (["--mix", "free=1"], "mix"),
    (["--seed", "1"], "seed 0 (not 1)"),
    (["--prompts", "OTHER"], "prompts"),
    (["--teacher", "OTHER"], "teacher"),
])
def test_other_settings_are_refused_with_one_line(finished, teacher_folder, corpus, tmp_path, capsys, change,
                                                  named):
    args = synth_args(teacher_folder, finished, corpus)
    if change == ["--teacher", "OTHER"]:  # the same content elsewhere is another source
        change = [change[0], str(shutil.copytree(teacher_folder, tmp_path / "teacher"))]
    elif change == ["--prompts", "OTHER"]:
        change = [change[0], str(shutil.copy(corpus, tmp_path / "corpus.txt"))]
    assert cli.main(args + change) == 2  # argparse keeps the last of a repeated option
    line = error_line(capsys)
    assert "was sampled with other settings" in line and named in line


@pytest.mark.parametrize("argv, message", [
    (["--mix", "chat=1,story=1"], "'story=1' is not KIND=SHARE"),
    (["--mix", "chat=-1"], "must be >= 0"),
    (["--mix", "chat=0"], "must add up to a positive number"),
    (["--seq-len", "8"], "argument --seq-len"),
    (["--tokens", "0"], "argument --tokens"),
])
def test_bad_arguments_are_one_line(teacher_folder, corpus, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(synth_args(teacher_folder, tmp_path / "out", corpus, *argv))
    assert exit_.value.code == 2 and message in error_line(capsys)


def test_documents_without_prompts_and_a_foreign_folder_are_refused(teacher_folder, tmp_path, capsys):
    base = ["synth", "--teacher", str(teacher_folder), "--tokens", "10", "--seq-len", str(SEQ_LEN)]
    assert cli.main(base + ["--output", str(tmp_path / "a"), "--mix", "documents=1"]) == 2
    assert "no --prompts was given" in error_line(capsys)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert cli.main(base + ["--output", str(tmp_path / "b")]) == 2
    assert "holds files but no synth.json" in error_line(capsys)


# ---- sampling -------------------------------------------------------------------------------------

def greedy_reference(model, prompt: list[int], new_tokens: int, stops: list[int]) -> list[int]:
    """The teacher's own greedy `generate` of one unpadded prompt, up to its first stop token."""
    ids = torch.tensor([prompt])
    output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, eos_token_id=stops,
                            pad_token_id=stops[0])[0, len(prompt):].tolist()
    end = next((i + 1 for i, token in enumerate(output) if token in stops), len(output))
    return output[:end]


def test_greedy_sampling_equals_generate_for_every_family(build_teacher, family):
    """Prompts of different lengths, left-padded in one batch, each continue as alone."""
    model = build_teacher(family)
    prompts = [[5, 17, 33, 90, 4, 8, 11], [200, 7], [1, 2, 3, 4]]
    expected = [greedy_reference(model, prompt, 40 - 7, [0]) for prompt in prompts]  # before the sampler
    plan = DecodingPlan(max_new_tokens=0, eos_token_ids=(0,), pad_token_id=0)  # sets the model's attention
    assert BatchSampler(model, 3, 40, plan).sample(prompts) == expected


def test_grouped_query_attention_is_sdpa_attention():
    """One query token, 6 query heads over 2 key/value heads, a mask hiding some slots of each row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(shape, generator=generator) for shape in ((3, 6, 1, 8), (3, 2, 10, 8),
                                                                               (3, 2, 10, 8)))
    mask = torch.rand(3, 1, 1, 10, generator=generator) < 0.7
    mask[..., 0] = True
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    ours, _ = sampler_module.grouped_query_attention(module, query, key, value, mask, scaling=0.3)
    reference, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(ours, reference)


def test_greedy_synth_equals_generate(teacher_folder, corpus, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "greedy"
    assert cli.main(synth_args(teacher_folder, output, corpus, "--temperature", "0", tokens=100)) == 0
    model = AutoModelForCausalLM.from_pretrained(teacher_folder).eval()
    stops = [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for shard in manifest_of(output)["shards"]:
        table = pyarrow.parquet.read_table(output / shard["file"]).to_pylist()
        width = max(row["prompt_tokens"] for row in table)  # the longest prompt of the batch
        for row in table:
            prompt = row["ids"][:row["prompt_tokens"]]
            assert row["ids"][len(prompt):] == greedy_reference(model, prompt, SEQ_LEN - width, stops)


def test_rows_that_end_are_cut_and_one_sampler_serves_batch_after_batch(build_teacher):
    model = build_teacher("llama")

    def sampler(end: int) -> BatchSampler:
        plan = DecodingPlan(max_new_tokens=0, eos_token_ids=(end,), pad_token_id=0)
        return BatchSampler(model, 2, 32, plan)

    free = sampler(0).sample([[5, 6, 7], [8]])
    end = free[0][4]  # a token row 0 writes: with it as the stop token, the row ends there
    ending = sampler(end)
    assert ending.sample([[5, 6, 7], [8]])[0] == free[0][:free[0].index(end) + 1]
    assert ending.sample([[9, 10], [11, 12, 13, 14]]) == sampler(end).sample([[9, 10], [11, 12, 13, 14]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_graph_replays_the_eager_loop(build_teacher, monkeypatch):
    model = build_teacher("llama").cuda()
    plan = DecodingPlan(max_new_tokens=0, eos_token_ids=(0,), pad_token_id=0)
    prompts = [[int(t) for t in torch.randint(1, 320, (n,))] for n in (3, 9, 1, 5)]
    graphed = BatchSampler(model, 4, 64, plan)
    assert graphed.sample(prompts) == graphed.sample(prompts)  # the capture's steps leave nothing behind
    assert graphed.graph is not None
    monkeypatch.setattr(sampler_module, "capture", lambda step: None)  # never captured: eager on the GPU
    assert BatchSampler(model, 4, 64, plan).sample(prompts) == graphed.sample(prompts)
    monkeypatch.undo()
    sampling = DecodingPlan(max_new_tokens=0, do_sample=True, temperature=0.8, eos_token_ids=(0,),
                            pad_token_id=0)
    graphed = BatchSampler(model, 4, 64, sampling)
    first = graphed.sample(prompts, seed=3)  # captured on this call: the seed still sets the noise
    assert graphed.sample(prompts, seed=3) == first != graphed.sample(prompts, seed=4)


# ---- distilling on the shards ---------------------------------------------------------------------

def test_distill_trains_on_the_shards_and_refuses_another_tokenizer(finished, teacher_folder, corpus,
                                                                    tmp_path, tiny_tokenizer, capsys):
    config = tmp_path / "quick.yaml"
    config.write_text("data:\n  eval_tokens: 0\nlog:\n  progress: false\n  tensorboard: false\n"
                      "stage1:\n  warmup_steps: 1\n", encoding="utf-8")
    args = ["-q", "distill", "--config", str(config), "--teacher", str(teacher_folder), "--stage", "1",
            "--max-steps", "2", "--seq-len", "32", "--batch-size", "2"]
    assert cli.main(args + ["--data", str(finished), "--output", str(tmp_path / "run")]) == 0
    assert len(read_log(tmp_path / "run" / "stage1" / "log.jsonl")) == 2
    capsys.readouterr()

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_folder, other)
    tokenizer = tiny_tokenizer.__class__.from_pretrained(teacher_folder)
    tokenizer.add_tokens(["<another token>"])
    tokenizer.save_pretrained(other)
    assert cli.main(synth_args(other, tmp_path / "foreign", corpus, tokens=10)) == 0
    assert cli.main(args + ["--data", str(tmp_path / "foreign"), "--output", str(tmp_path / "run2")]) == 2
    assert "made with another tokenizer" in error_line(capsys)
