"""The decoder's KV cache for ONNX Runtime: one buffer per layer and side, written in place.

``decoder.onnx`` (``export/decoder_graph.py``) attends with ``GroupQueryAttention`` over
buffers ``[B, kv_heads, capacity, head_dim]`` that are bound as both its ``past`` and its
``present``: ONNX Runtime writes the new tokens' keys and values into the rows after the
first ``length`` and copies nothing (the ``Concat`` of a plain graph copies the whole cache
every step). Beside the buffers lives each slot's rotation (M-RoPE ``cos``/``sin`` rows), which
the graph reads by slot index.

A state is continued by one caller, once per step: ``advance`` writes after ``length``, so two
continuations of one state would write the same rows. Each request (or micro-batch) gets its
own state from ``prefill``, so concurrent requests never share buffers.
"""

from __future__ import annotations

import numpy as np

from ..model.rope import rotary_rows

MIN_CAPACITY = 256  # slots first allocated beyond the prompt: most answers fit without growing


class DecoderState:
    """KV buffers, rotation rows and the number of cached tokens of one batch of sequences."""

    def __init__(self, ort, *, batch: int, layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype, rope: dict, device: tuple[str, int] = ("cpu", 0)):
        self._ort, self.device = ort, device
        self.batch, self.layers, self.kv_heads, self.head_dim = batch, layers, kv_heads, head_dim
        self.dtype, self.rope = np.dtype(dtype), rope
        self.length = 0
        self.capacity = 0
        self.buffers: list = []
        self.cos = np.zeros((0, head_dim // 2), self.dtype)
        self.sin = np.zeros((0, head_dim // 2), self.dtype)
        self.binding = None  # the caller's IO binding of the buffers; dropped when they are replaced
        # A decode step's small inputs live in host arrays wrapped once: ONNX Runtime reads numpy
        # memory in place, so a step rewrites a few numbers instead of building new values.
        self._seqlens = np.zeros(batch, np.int32)
        self._total = np.zeros((), np.int32)
        self._step_slots = np.zeros((batch, 1), np.int64)
        self._fixed = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in
                       (("seqlens_k", self._seqlens), ("total_sequence_length", self._total))}
        self._step_ids = ort.OrtValue.ortvalue_from_numpy(self._step_slots)
        self._grow(capacity)

    # -- storage ------------------------------------------------------------------------------
    def _buffer(self, shape):
        kind, index = self.device
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.dtype, kind, index)

    def _grow(self, capacity: int) -> None:
        """Room for ``capacity`` tokens; cached rows are copied into the new buffers."""
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        fresh = [self._buffer(shape) for _ in range(2 * self.layers)]
        if self.length:
            for old, new in zip(self.buffers, fresh):
                rows = np.zeros(shape, self.dtype)
                rows[:, :, :self.length] = old.numpy()[:, :, :self.length]
                new.update_inplace(rows)
        self.buffers = fresh
        self.binding = None
        for name in ("cos", "sin"):
            table = np.zeros((capacity, self.head_dim // 2), self.dtype)
            table[:self.length] = getattr(self, name)[:self.length]
            setattr(self, name, table)
        # the whole table is bound: the op needs rows >= total length and reads by slot
        self._tables = {"cos_cache": self._ort.OrtValue.ortvalue_from_numpy(self.cos),
                        "sin_cache": self._ort.OrtValue.ortvalue_from_numpy(self.sin)}
        self.capacity = capacity

    # -- one decoder call -----------------------------------------------------------------------
    def feeds(self, positions: np.ndarray) -> dict:
        """Inputs (OrtValues) for a call that adds ``S`` tokens at M-RoPE ``positions`` ``[3, B, S]``
        (or ``[3, S]``).

        Every sequence of the batch must share the positions (same layout, same step): the
        rotation table is one per state. The values stay valid until the next ``feeds``.
        """
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim == 3:
            if pos.shape[1] > 1 and not (pos == pos[:, :1]).all():
                raise ValueError("decoder: the sequences of one batch must share their positions")
            pos = pos[:, 0]
        s = int(pos.shape[-1])
        total = self.length + s
        if total > self.capacity:
            self._grow(max(2 * self.capacity, total + MIN_CAPACITY))
        self.cos[self.length:total], self.sin[self.length:total] = rotary_rows(
            pos, self.rope["inv_freq"], self.rope["mrope_section"], self.rope.get("attention_scaling", 1.0),
            self.dtype)
        self._seqlens[:] = total - 1
        self._total[()] = total
        if s == 1:
            self._step_slots[:] = self.length
            ids = self._step_ids
        else:
            slots = np.arange(self.length, total, dtype=np.int64)
            ids = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.broadcast_to(slots, (self.batch, s))))
        return {**self._fixed, "position_ids": ids, **self._tables}

    def advance(self, tokens: int) -> None:
        """The call that ``feeds`` prepared has run: its tokens are cached."""
        self.length += int(tokens)
