"""Tiny students for the export, generation and evaluation tests, and the fixtures that build them.

A student is a random tiny teacher (tests/conftest.py) converted by `convert`, with layers 0, 1 and 3
as RWKV-7 and layer 2 kept as softmax attention; its mixers are moved off their initial values so
that no term of the time mix is trivially zero (the output projection starts at zero). The student
shares the teacher's other tensors, so only the mixers' parameters are perturbed: the teacher stays
the teacher.
"""

import json
from pathlib import Path

import pytest
import torch

from rwkvinside.export.export import export_student
from rwkvinside.modeling.convert import ConversionSpec, convert
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.student_folder import save_student

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
CONVERTED = (0, 1, 3)
PROVENANCE = {"teacher": "tiny-random", "stage": 2, "tokens": 3000, "steps": 12,
              "history": [{"stage": 1, "tokens": 2000, "steps": 8}, {"stage": 2, "tokens": 1000, "steps": 4}]}


def mixer_parameters(student: RWKVInsideForCausalLM) -> list[torch.nn.Parameter]:
    return [p for slot in student.converted_attention().values() for p in slot.mixer.parameters()]


def tiny_student(build_teacher, family: str = "llama", layers: tuple[int, ...] | None = CONVERTED,
                 seed: int = 0) -> RWKVInsideForCausalLM:
    student = convert(build_teacher(family, seed=seed), ConversionSpec(layers=layers)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixer_parameters(student):
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return student


def make_run(run: Path, build_teacher, tokenizer, stages: dict[int, int],
             provenance: dict | None = None) -> Path:
    """A run folder as `rwkvinside distill --output run` leaves it: run.json and, for each finished
    stage (number -> the seed of its tiny student, so stages give different logits), stageN/student
    whose provenance names the run."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps({"stages": sorted(stages)}))
    for number, seed in stages.items():
        save_student(tiny_student(build_teacher, seed=seed), tokenizer, run / f"stage{number}" / "student",
                     {**PROVENANCE, "stage": number, "run": str(run.resolve()), **(provenance or {})})
    return run


@pytest.fixture(scope="session")
def build_teacher(pytestconfig):
    """tests/conftest.py's build_tiny_teacher (found through pytest: conftest modules share a name)."""
    return pytestconfig.pluginmanager.get_plugin(str(ROOT_CONFTEST)).build_tiny_teacher


@pytest.fixture(scope="session")
def remote_code_cache(tmp_path_factory):
    """transformers copies remote code into its modules cache, one per process: a temporary one (the
    same folder for every conftest that imports this fixture)."""
    import transformers.dynamic_module_utils

    folder = tmp_path_factory.getbasetemp() / "hf-modules"
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(folder))
        yield


@pytest.fixture(scope="session")
def student_dir(build_teacher, tiny_tokenizer, tmp_path_factory) -> Path:
    """A Llama student folder, as a distillation stage writes it."""
    folder = tmp_path_factory.mktemp("student") / "student"
    save_student(tiny_student(build_teacher), tiny_tokenizer, folder, PROVENANCE)
    return folder


@pytest.fixture(scope="session")
def exported_dir(student_dir, tmp_path_factory) -> Path:
    """`student_dir` exported in float32 (so logits compare at float32 tolerance)."""
    return export_student(student_dir, tmp_path_factory.mktemp("export") / "exported", dtype="fp32")
