import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
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


class DecoderGraphRunner:
    """``decoder_graph.build_decoder(model)`` (or ``graph``) in an ONNX Runtime session over one
    growing KV state, run by ``OnnxStages``' own ``run_decoder``."""

    def __init__(self, model, tmp_path, graph=None, batch: int = 1, capacity: int = 8):
        import onnx
        import onnxruntime as ort

        from fusar_edge.backends.kv_cache import DecoderState
        from fusar_edge.export.decoder_graph import build_decoder, decoder_spec

        path = tmp_path / "decoder.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(graph if graph is not None else build_decoder(model), str(path))
        self.ort, self.sess = ort, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = decoder_spec(model)
        self.new_state = lambda: DecoderState(ort, batch=batch, layers=spec["num_layers"],
                                              kv_heads=spec["num_kv_heads"], head_dim=spec["head_dim"],
                                              capacity=capacity, dtype=np.float32, rope=spec["rope"])
        self.state = None

    def __call__(self, embeds, positions, fresh: bool = True):
        """-> (last_hidden_state, logits) as numpy; the cache starts empty unless ``fresh`` is False."""
        from fusar_edge.backends.onnxruntime import run_decoder

        if fresh or self.state is None:
            self.state = self.new_state()
        embeds = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.asarray(embeds, np.float32)))
        hidden, logits = run_decoder(self.sess, self.state, embeds, positions, ["last_hidden_state", "logits"])
        return hidden.numpy(), logits.numpy()
