"""A bounded, thread-safe LRU of GRASP's question encodings, keyed by the question's token ids.

GRASP's query vector is the language model's view of the question alone: a whole text-only pass
over the LLM before the first token (on a 7B model the largest part of time-to-first-token after
the vision tower). Operators ask the same few questions of many scenes, so the encoding is kept
by token ids; a hit skips the pass and gives the very tensor the miss computed, so answers are
unchanged. ``maxsize`` bounds memory (one ``[C]`` or ``[1, n, C]`` tensor per entry); 0 turns it off.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .lru import BoundedCache


class QuestionCache(BoundedCache):
    def __init__(self, maxsize: int = 256):
        super().__init__(maxsize)

    def get(self, question_ids, compute: Callable[[], Any]) -> Any:
        """The cached encoding of ``question_ids`` (a tensor, array or list of ids), or ``compute()``."""
        return self.lookup(tuple(np.asarray(question_ids).reshape(-1).tolist()), compute)
