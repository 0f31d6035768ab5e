import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """A tiny random llama with an offline tokenizer and chat template."""
    from tiny_chat import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat") / "model")


@pytest.fixture(scope="session")
def tiny_chat_untied(tmp_path_factory):
    from tiny_chat import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_untied") / "model", tie=False)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT-2 (absolute position embeddings); its config keeps GPT-2's dropout
    (0.1 on embeddings, attention and residuals)."""
    from tiny_chat import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny_gpt2") / "model", model_type="gpt2")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls are orders of magnitude slower multi-threaded on a busy
    2-core machine; modules of tiny-model tests opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
