import pytest
import torch

from tests.tiny import tiny_gemma, tiny_tokenizer


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _small_dev_sets(monkeypatch):
    """Tiny models need no 256-row dev sets to test the machinery (a run's default dev
    evaluations happen at its start and end): 16 rows, 8 for generation, in this process."""
    from zoobj.run import config

    monkeypatch.setitem(config.DEV_LIMITS, "classification", 16)
    monkeypatch.setitem(config.DEV_LIMITS, "generation", 8)


@pytest.fixture(autouse=True)
def _no_default_recipe(request, monkeypatch):
    """Tests of the machinery run a task with the settings they give, full parameters
    otherwise, as before the default recipe (zoobj.run.recipes); a test marked
    ``default_recipe`` gets it."""
    if request.node.get_closest_marker("default_recipe") is None:
        from zoobj.run import recipes

        monkeypatch.setattr(recipes, "DEFAULT_RECIPES", {})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Gemma-3 model and tokenizer saved with save_pretrained (a --model folder)."""
    path = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    tiny_gemma(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
