"""`rwkvinside export`: the folder, its generated code, remote-code loading and loading back."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from export.students import PROVENANCE, tiny_student
from rwkvinside.cli import main
from rwkvinside.errors import UserError
from rwkvinside.export.codegen import CONFIGURATION_FILE, MODELING_FILE, generate
from rwkvinside.export.export import export_student
from rwkvinside.modeling.student import load_student, save_student

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 180, 33, 2, 64, 121]])


def test_exported_folder_layout(exported_dir):
    config = json.loads((exported_dir / "config.json").read_text())
    assert config["model_type"] == "rwkvinside"
    assert config["auto_map"] == {"AutoConfig": "configuration_rwkvinside.RWKVInsideConfig",
                                  "AutoModelForCausalLM": "modeling_rwkvinside.RWKVInsideForCausalLM"}
    assert config["architectures"] == ["RWKVInsideForCausalLM"]
    assert config["rwkv_layers"] == [0, 1, 3] and config["text_config"]["model_type"] == "llama"
    for name in (CONFIGURATION_FILE, MODELING_FILE, "model.safetensors", "tokenizer.json", "rwkvinside.json",
                 "generation_config.json", "README.md"):
        assert (exported_dir / name).is_file(), name
    assert AutoTokenizer.from_pretrained(exported_dir).chat_template  # the chat template travels
    card = (exported_dir / "README.md").read_text()
    assert "tiny-random" in card and "3,000 tokens in all" in card
    assert "Layer 2 keeps softmax attention" in card
    assert "trust_remote_code=True" in card


def test_modeling_file_is_generated_from_the_live_sources(exported_dir):
    """The export writes what the generator makes of the package's sources right now: nothing to go stale."""
    for name in (CONFIGURATION_FILE, MODELING_FILE):
        assert (exported_dir / name).read_text() == generate(name)
    text = generate(MODELING_FILE)
    assert "do NOT edit" in text and "# ---- rwkvinside/modeling/time_mixer.py ----" in text
    assert "import rwkvinside" not in text and "from rwkvinside" not in text
    # transformers refuses remote code whose imports are not installed: only these may be required.
    needed = set(transformers.dynamic_module_utils.get_imports(exported_dir / MODELING_FILE))
    assert needed - set(sys.stdlib_module_names) == {"torch", "transformers", "safetensors"}, needed


def test_remote_code_matches_the_toolkit_for_every_family(build_teacher, tiny_tokenizer, family, tmp_path,
                                                          remote_code_cache):
    student = tiny_student(build_teacher, family)
    save_student(student, tiny_tokenizer, tmp_path / "student", PROVENANCE)
    folder = export_student(tmp_path / "student", tmp_path / f"exported-{family}", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(exported).__module__.startswith("transformers_modules")  # the generated code
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, student(IDS).logits, rtol=1e-5, atol=1e-5)
    if student.config.tie_word_embeddings:
        assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


LOAD_WITHOUT_RWKVINSIDE = """
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "rwkvinside":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")

sys.meta_path.insert(0, Blocker())
try:
    import rwkvinside
    sys.exit("rwkvinside is still importable")
except ModuleNotFoundError:
    pass

import torch
from transformers import AutoModelForCausalLM

folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(ids).logits
tokens = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "tokens": tokens}, sys.argv[3])
"""


def test_loads_with_only_torch_and_transformers(exported_dir, student_dir, tmp_path):
    result_file = tmp_path / "result.pt"
    env = {"PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_WITHOUT_RWKVINSIDE), str(exported_dir),
                    json.dumps(IDS.tolist()), str(result_file)], check=True, env=env, timeout=300)
    result = torch.load(result_file)
    student, _, _ = load_student(student_dir)
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], student(IDS).logits, rtol=1e-5, atol=1e-5)
    expected = student.generate(IDS[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(result["tokens"], expected)


def test_exported_folder_loads_back_to_continue_training(exported_dir, student_dir):
    original, _, _ = load_student(student_dir)
    reloaded, tokenizer, metadata = load_student(exported_dir)
    assert tokenizer is not None and metadata["conversion"]["layers"] == [0, 1, 3]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, original(IDS).logits, rtol=0, atol=0)
    reloaded.select_trainable("all")
    reloaded(IDS).logits.mean().backward()
    assert all(p.grad is not None for p in reloaded.model.parameters())  # no dead weights


def test_bf16_export_holds_bf16_weights(student_dir, tmp_path):
    folder = export_student(student_dir, tmp_path / "bf16")
    weights = load_file(folder / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in weights  # tied to the embeddings, stored once


def _cli_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rwkvinside: error:")
    return err


def test_bad_checkpoints_are_one_line_errors(student_dir, build_teacher, tmp_path, capsys):
    assert "is not a student checkpoint" in _cli_error(["export", "--checkpoint", str(tmp_path),
                                                        "--output", str(tmp_path / "out")], capsys)

    no_tokenizer = tmp_path / "no-tokenizer"
    save_student(tiny_student(build_teacher), None, no_tokenizer, PROVENANCE)
    assert "has no tokenizer files" in _cli_error(["export", "--checkpoint", str(no_tokenizer),
                                                   "--output", str(tmp_path / "out")], capsys)

    corrupt = tmp_path / "corrupt"
    save_student(tiny_student(build_teacher), None, corrupt, PROVENANCE)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "is corrupt or unreadable" in _cli_error(["export", "--checkpoint", str(corrupt),
                                                     "--output", str(tmp_path / "out")], capsys)

    older = tmp_path / "older"
    save_student(tiny_student(build_teacher), None, older, PROVENANCE)
    metadata = json.loads((older / "rwkvinside.json").read_text())
    (older / "rwkvinside.json").write_text(json.dumps(metadata | {"format": 1}))
    assert "holds a student of format 1" in _cli_error(["export", "--checkpoint", str(older),
                                                        "--output", str(tmp_path / "out")], capsys)


def test_export_refuses_a_folder_holding_files(student_dir, exported_dir):
    with pytest.raises(UserError, match="already exists"):
        export_student(student_dir, exported_dir)


def test_cli_export(student_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(student_dir), "--output", str(tmp_path / "out"),
                 "--dtype", "fp16"]) == 0
    assert "exported to" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "rwkvinside.json").read_text())["export"]["dtype"] == "fp16"
    assert not Path(str(tmp_path / "out") + ".tmp").exists()


@pytest.mark.slow
def test_the_embedded_teacher_exports_and_loads_as_remote_code(tmp_path, remote_code_cache):
    """SmolLM2-135M (9 query / 3 key-value heads, its own tokenizer and chat template), 3 of 30 layers
    kept as attention: the remote-code model gives the toolkit's logits."""
    from rwkvinside.modeling.hybrid import ConversionSpec, HybridModel
    from rwkvinside.modeling.loading import embedded_teacher_path, load_teacher

    try:
        embedded_teacher_path()
    except UserError as error:
        pytest.skip(str(error))

    teacher, tokenizer = load_teacher("smollm2-135m")
    student = HybridModel(teacher, ConversionSpec(layers=tuple(i for i in range(30) if i % 10)), align=False)
    save_student(student.eval(), tokenizer, tmp_path / "student", PROVENANCE)
    folder = export_student(tmp_path / "student", tmp_path / "exported", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    prompt = AutoTokenizer.from_pretrained(folder, trust_remote_code=True).apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(exported(prompt["input_ids"]).logits, student(prompt["input_ids"]).logits,
                                   rtol=1e-4, atol=1e-4)
