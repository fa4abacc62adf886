import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter (must be set before any
# kernel module is imported); on a GPU machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model():
    from fusar_edge.config import preset
    from fusar_edge.model.bundle import build_random

    return build_random(preset("tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fusar_edge.tokenizer import TextTokenizer

    return TextTokenizer.tiny()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def one_line(exc_info, *words):
    """The error message is one line and names every given word (file, field, value)."""
    msg = str(exc_info.value)
    assert "\n" not in msg
    for w in words:
        assert str(w) in msg, (w, msg)
    return msg
