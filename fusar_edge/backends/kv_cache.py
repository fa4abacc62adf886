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
        self.buffers: list = []  # OrtValues bound as past and present
        self._host: list = []  # on CPU their numpy memory (None per buffer elsewhere)
        self.cos = np.zeros((0, head_dim // 2), self.dtype)
        self.sin = np.zeros((0, head_dim // 2), self.dtype)
        self.bindings: dict = {}  # the caller's IO binding of the buffers, per session; dropped when they are replaced
        self.step_io = None  # a decode step's bindings, made once (onnxruntime.StepBinding); dropped likewise
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
        if kind == "cpu":  # numpy memory that ONNX Runtime reads and writes in place: rows copy in by numpy
            host = np.empty(shape, self.dtype)
            return host, self._ort.OrtValue.ortvalue_from_numpy(host)
        return None, self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.dtype, kind, index)

    def _write_rows(self, index: int, rows: np.ndarray) -> None:
        """``rows [B or 1, kv_heads, n, head_dim]`` into slots ``0..n`` of buffer ``index`` (every sequence)."""
        n = rows.shape[2]
        host = self._host[index]
        if host is not None:
            host[:, :, :n] = rows
            return
        full = self.buffers[index].numpy()  # a device buffer: through host memory, whole
        full[:, :, :n] = rows
        self.buffers[index].update_inplace(np.ascontiguousarray(full))

    def _grow(self, capacity: int) -> None:
        """Room for ``capacity`` tokens; cached rows are copied into the new buffers."""
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        old = self.cached_rows() if self.length else None
        self._host, self.buffers = map(list, zip(*(self._buffer(shape) for _ in range(2 * self.layers))))
        self.bindings, self.step_io = {}, None
        if old is not None:
            for index, rows in enumerate(old):
                self._write_rows(index, rows)
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

    @property
    def on_host(self) -> bool:
        """The buffers are numpy memory (CPU): a decode step can keep everything bound."""
        return bool(self._host) and self._host[0] is not None

    # -- a cached prompt prefix -------------------------------------------------------------------
    def cached_rows(self) -> list[np.ndarray]:
        """Copies of every buffer's cached rows ``[B, kv_heads, length, head_dim]`` (layer-major,
        key then value)."""
        views = self._host if self.on_host else [b.numpy() for b in self.buffers]
        return [np.array(v[:, :, :self.length]) for v in views]

    def load_prefix(self, rows: list[np.ndarray], cos: np.ndarray, sin: np.ndarray) -> None:
        """Start an empty state with a prefix computed before (``cached_rows`` of a batch-1 state,
        its rotation rows): every sequence gets the same rows, the next call writes after them."""
        n = rows[0].shape[2]
        if self.length or len(rows) != len(self.buffers):
            raise ValueError("load_prefix: an empty state and one row block per buffer are needed")
        if n > self.capacity:
            self._grow(n + MIN_CAPACITY)
        for index, block in enumerate(rows):
            self._write_rows(index, block)
        self.cos[:n], self.sin[:n] = cos, sin
        self.length = n
