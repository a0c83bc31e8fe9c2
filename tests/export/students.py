"""Tiny students for the export, generation and evaluation tests, and the fixtures that build them.

A student is a random tiny teacher (tests/conftest.py) with layers 0, 1 and 3 converted and layer 2
kept as softmax attention; its mixers are moved off their initial values so that no term of the
time mix is trivially zero (the output projection starts at zero).
"""

from pathlib import Path

import pytest
import torch

from rwkvinside.export.export import export_student
from rwkvinside.modeling.hybrid import ConversionSpec, HybridModel
from rwkvinside.modeling.student import save_student

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
CONVERTED = (0, 1, 3)
PROVENANCE = {"teacher": "tiny-random", "stage": 2, "tokens": 3000, "steps": 12,
              "history": [{"stage": 1, "tokens": 2000, "steps": 8}, {"stage": 2, "tokens": 1000, "steps": 4}]}


def tiny_student(build_teacher, family: str = "llama", layers: tuple[int, ...] | None = CONVERTED,
                 seed: int = 0) -> HybridModel:
    model = HybridModel(build_teacher(family, seed=seed), ConversionSpec(layers=layers), align=False).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.student_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


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
    """A Llama student checkpoint folder, as a distillation stage writes it."""
    folder = tmp_path_factory.mktemp("student") / "student"
    save_student(tiny_student(build_teacher), tiny_tokenizer, folder, PROVENANCE)
    return folder


@pytest.fixture(scope="session")
def exported_dir(student_dir, tmp_path_factory) -> Path:
    """`student_dir` exported in float32 (so logits compare at float32 tolerance)."""
    return export_student(student_dir, tmp_path_factory.mktemp("export") / "exported", dtype="fp32")
