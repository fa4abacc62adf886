"""The one in-memory form of a 4-bit weight that every part of the export pipeline shares.

GPTQ / RTN (``gptq.py``) produce it, the Hugging Face GPTQ checkpoint format
(``gptq_format.py``) stores and loads it, and the ONNX packers (``int4_onnx.py``) turn it
into ``MatMulNBits``. Symmetric only: the zero point is 0 in signed form (8 in the unsigned
form checkpoints and ONNX store), so the same weights map onto ONNX Runtime's MatMulNBits and,
through the GPTQ checkpoint, TensorRT Edge-LLM's INT4 GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int4Weight:
    """``W[out, in] ~= q * scales`` per group of ``group_size`` consecutive input columns.

    ``q``: int8 ``[out, in]`` with values in ``[-8, 7]``; ``scales``: float32
    ``[out, in // group_size]`` (``in`` must be a multiple of ``group_size``); ``bias``:
    float32 ``[out]`` or None; ``name``: the linear module's qualified name.
    """

    name: str
    q: torch.Tensor
    scales: torch.Tensor
    group_size: int
    bias: torch.Tensor | None = None

    def __post_init__(self):
        out_f, in_f = self.q.shape
        if self.q.dtype != torch.int8 or int(self.q.min()) < -8 or int(self.q.max()) > 7:
            raise ValueError(f"{self.name}: q must be int8 in [-8, 7]")
        if in_f % self.group_size or self.scales.shape != (out_f, in_f // self.group_size):
            raise ValueError(f"{self.name}: scales {list(self.scales.shape)} do not match q {list(self.q.shape)} "
                             f"with group size {self.group_size}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[out, in]``."""
        out_f, in_f = self.q.shape
        g = self.q.float().view(out_f, in_f // self.group_size, self.group_size)
        return (g * self.scales.float().unsqueeze(-1)).view(out_f, in_f)
