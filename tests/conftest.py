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
    growing KV state, fed as ``OnnxStages`` feeds it: the cache buffers bound as past and present."""

    def __init__(self, model, tmp_path, graph=None, batch: int = 1, capacity: int = 8):
        import onnx
        import onnxruntime as ort

        from fusar_edge.backends.kv_cache import DecoderState
        from fusar_edge.export.decoder_graph import build_decoder, decoder_spec

        path = tmp_path / "decoder.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(graph if graph is not None else build_decoder(model), str(path))
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = decoder_spec(model)
        self.layers = spec["num_layers"]
        self.new_state = lambda: DecoderState(ort, batch=batch, layers=spec["num_layers"],
                                              kv_heads=spec["num_kv_heads"], head_dim=spec["head_dim"],
                                              capacity=capacity, dtype=np.float32, rope=spec["rope"])
        self.state = None

    def __call__(self, embeds, positions, fresh: bool = True):
        """-> (last_hidden_state, logits) as numpy; the cache starts empty unless ``fresh`` is False."""
        if fresh or self.state is None:
            self.state = self.new_state()
        st = self.state
        feeds = {"inputs_embeds": np.ascontiguousarray(np.asarray(embeds, np.float32)), **st.feeds(positions)}
        io = self.sess.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        io.bind_output("last_hidden_state")
        io.bind_output("logits")
        for i in range(self.layers):
            for j, side in enumerate(("key", "value")):
                io.bind_ortvalue_input(f"past_key_values.{i}.{side}", st.buffers[2 * i + j])
                io.bind_ortvalue_output(f"present.{i}.{side}", st.buffers[2 * i + j])
        self.sess.run_with_iobinding(io)
        st.advance(np.asarray(positions).shape[-1])
        hidden, logits = io.get_outputs()[:2]
        return hidden.numpy(), logits.numpy()
