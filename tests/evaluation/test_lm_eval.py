"""lm-evaluation-harness on a student: the "rwkvinside" adapter, and lm-eval's own "hf" on an export.

The tasks are defined here from local files (a YAML task over a JSONL dataset); nothing is downloaded.
"""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "To be, or not to", "choices": [" be", " go", " fox"], "answer": 0},
    {"question": "The quick brown", "choices": [" dog", " fox", " girl"], "answer": 1},
    {"question": "Once upon a", "choices": [" question", " lazy", " time"], "answer": 2},
    {"question": "jumps over the lazy", "choices": [" dog", " be", " read"], "answer": 0},
]
TASKS = """\
task: {name}_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GENERATE_TASK = """\
task: {name}_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture
def task_manager(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "choice.yaml").write_text(TASKS.format(name="tiny", data=data))
    (tmp_path / "generate.yaml").write_text(GENERATE_TASK.format(name="tiny", data=data))
    from lm_eval.tasks import TaskManager

    # include_defaults=False: index only these tasks, not lm-eval's thousands of built-in ones.
    return TaskManager(include_path=str(tmp_path), include_defaults=False)


def run(model: str, model_args: dict, task_manager) -> dict:
    """Per task, (doc id, filtered responses) sorted by doc id; and the choice task's accuracy."""
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, task_manager=task_manager,
                                      tasks=["tiny_choice", "tiny_generate"], batch_size=2, device="cpu",
                                      log_samples=True)
    responses = {}
    for task, samples in results["samples"].items():
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        responses[task] = [(s["doc_id"], s["filtered_resps"]) for s in ordered]
    return {**responses, "acc": results["results"]["tiny_choice"]["acc,none"]}


@pytest.fixture(scope="module")
def run_dir(build_teacher, tiny_tokenizer, tmp_path_factory):
    """A run folder whose last finished stage (2) holds the student of `student_dir` (stage 1 another)."""
    from export.students import make_run

    return make_run(tmp_path_factory.mktemp("run") / "run", build_teacher, tiny_tokenizer, {1: 1, 2: 0})


@pytest.mark.parametrize("folder", ["student_dir", "run_dir", "exported_dir"])
def test_adapter_on_any_student_folder_equals_hf_on_the_export(folder, request, exported_dir, task_manager,
                                                                remote_code_cache):
    """The adapter loads a stage's student folder, a run folder (its last stage's student) or an
    exported folder with rwkvinside's class; lm-eval's own "hf" loads the export through remote code."""
    import rwkvinside.evaluation.lm_eval_adapter  # noqa: F401  (registers "rwkvinside")

    pretrained = str(request.getfixturevalue(folder))
    ours = run("rwkvinside", {"pretrained": pretrained, "dtype": "float32"}, task_manager)
    theirs = run("hf", {"pretrained": str(exported_dir), "trust_remote_code": True, "dtype": "float32"},
                 task_manager)
    assert len(ours["tiny_choice"]) == len(DOCS) and len(ours["tiny_generate"]) == len(DOCS)
    assert ours["tiny_generate"] == theirs["tiny_generate"]  # greedy text, batched with left padding
    for (_, mine), (_, hf) in zip(ours["tiny_choice"], theirs["tiny_choice"], strict=True):
        assert [round(float(c[0]), 4) for c in mine] == [round(float(c[0]), 4) for c in hf]
    assert ours["acc"] == theirs["acc"]
