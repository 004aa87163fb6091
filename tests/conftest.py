import pytest
import torch

from tests.tiny import tiny_gemma, tiny_tokenizer


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Gemma-3 model and tokenizer saved with save_pretrained (a --model folder)."""
    path = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    tiny_gemma(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
