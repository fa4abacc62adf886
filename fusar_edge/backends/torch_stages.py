"""The torch backend: the ``FusarModel`` behind the runtime's stage interface.

Imported only when a runtime opens with ``backend="torch"`` (or by export and training), so
the ONNX Runtime path never loads torch. ``OnnxStages`` (``backends.onnxruntime``) offers the
same methods over the exported graphs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FusarError, InputError
from ..model.fusar import as_tensor
from ..model.rope import text_positions
from ..question_cache import QuestionCache
from ..runtime import DTYPE_NAMES

DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}


def resolve_device(device: str, dtype) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FusarError(f"device {device!r}: this torch build sees no CUDA GPU (use --device cpu)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return dev, dtype


class TorchStages:
    """The torch model behind the runtime's stage interface.

    ``vision`` / ``fusion`` are the model's stages (one image); ``prefill_batch`` runs the
    decoder over B fused sequences of one length (``stack`` joins them), ``step_batch`` feeds
    one token per sequence; both return the last position's logits ``[B, V]`` and the KV state
    to pass to the next step. ``prefill`` / ``step`` are the one-sequence forms (``[V]``).
    Inputs may be numpy arrays (what the host side makes) or tensors.

    Stateless: the KV cache belongs to the caller (one per request), so one object serves
    any number of threads; the model's weights are only read. Every call runs under
    ``torch.inference_mode``.
    """

    def __init__(self, model, question_cache: int = 256):
        self.model = model
        self.has_grasp = model.grasp is not None
        self.has_tlm = model.tlm is not None
        self.questions = QuestionCache(question_cache)  # GRASP's question pass, by token ids

    @torch.inference_mode()
    def vision(self, pixels, grid_thw, anchors=None):
        return self.model.vision(pixels, grid_thw, anchors)

    @torch.inference_mode()
    def vision_batch(self, images: list[tuple]) -> list:
        """``vision`` of several ``(pixels, grid_thw, anchors)`` in one ViT call."""
        return self.model.vision_many(images)

    @torch.inference_mode()
    def fusion(self, input_ids, layout, visual_tokens, question_ids=None):
        model, q = self.model, None
        if model.grasp is not None and layout.prompt_len and question_ids is not None:
            q = self.questions.get(question_ids, lambda: model.question_vector(question_ids))
        return model.fusion(input_ids, layout, visual_tokens, question_ids, question_vector=q)

    @torch.inference_mode()
    def stack(self, embeds: list) -> torch.Tensor:
        return embeds[0] if len(embeds) == 1 else torch.cat(embeds, dim=0)

    @torch.inference_mode()
    def prefill_batch(self, embeds, positions, prefix_len: int = 0):
        """``prefix_len`` is accepted for the ONNX backend's interface: this reference path computes
        every position (``OnnxStages`` reuses a shared prompt head's KV rows)."""
        b = embeds.shape[0]
        logits, cache = self.model.decoder(embeds, as_tensor(positions).expand(3, b, -1), last_only=True)
        return logits[:, -1], cache

    @torch.inference_mode()
    def step_batch(self, tokens: list[int], position: int, state):
        model = self.model
        ids = torch.tensor(tokens, device=model.device).view(-1, 1)
        embeds = model.language_model.embed_tokens(ids)
        pos = np.broadcast_to(text_positions(position, 1), (3, len(tokens), 1))
        logits, cache = model.decoder(embeds, pos, state, last_only=True)
        return logits[:, -1], cache

    @torch.inference_mode()
    def prefill(self, embeds, positions, prefix_len: int = 0):
        logits, state = self.prefill_batch(embeds, positions, prefix_len)
        return logits[0], state

    def step(self, token: int, position: int, state):
        logits, state = self.step_batch([token], position, state)
        return logits[0], state
