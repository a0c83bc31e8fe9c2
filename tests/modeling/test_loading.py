"""Loading a teacher from a local source: errors that name the path, an HF folder round trip, and
the embedded SmolLM2-135M (slow)."""

import importlib.util
import json
import re

import pytest
import torch

from rwkvinside.errors import UserError
from rwkvinside.modeling.loading import EMBEDDED_PACKAGE, load_teacher, resolve_teacher

from .helpers import random_ids


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-teacher"
    with pytest.raises(UserError, match=re.escape(f"teacher path '{missing}' does not exist")):
        resolve_teacher(str(missing))


def test_file_that_is_not_gguf_is_named(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a model")
    with pytest.raises(UserError, match=re.escape(f"teacher file '{weights}' is not a .gguf file")):
        resolve_teacher(str(weights))


def test_folder_without_config_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=re.escape(f"teacher folder '{tmp_path}' has no config.json")):
        resolve_teacher(str(tmp_path))


def test_local_sources_resolve_to_themselves(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_teacher(str(tmp_path)) == tmp_path
    assert resolve_teacher(str(gguf)) == gguf


def test_unloadable_folder_is_a_user_error(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(UserError, match=re.escape(f"teacher '{tmp_path}'")):
        load_teacher(str(tmp_path))


def test_saved_teacher_loads_with_the_same_logits(tmp_path, make_teacher, tiny_tokenizer, family):
    teacher = make_teacher(family)
    teacher.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    loaded, tokenizer = load_teacher(str(tmp_path))

    assert type(loaded) is type(teacher) and not loaded.training
    assert loaded.config.use_cache is False
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert tokenizer("To be, or not to be").input_ids == tiny_tokenizer("To be, or not to be").input_ids
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, teacher(ids).logits, rtol=0, atol=0)


def test_teacher_loads_in_the_requested_dtype(tmp_path, make_teacher, tiny_tokenizer):
    make_teacher("llama").save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_teacher(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(EMBEDDED_PACKAGE) is None,
                    reason=f"the embedded teacher's package {EMBEDDED_PACKAGE} is not installed")
def test_embedded_smollm2_teacher():
    model, tokenizer = load_teacher("smollm2-135m")
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert len(model.model.layers) == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
