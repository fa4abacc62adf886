"""Greedy decoding settings from a checkpoint's ``generation_config.json``, applied on the host.

The FUSAR-GPT reference answers with ``model.generate(do_sample=False)``, and transformers'
``generate`` also applies the checkpoint's ``generation_config.json``: Qwen2.5-VL-*-Instruct
ships ``repetition_penalty: 1.05``, which changes greedy answers. ``GenerationSettings`` reads
that file and keeps what changes a greedy answer; ``GreedyPicker`` applies it to each step's
logits (numpy, so the torch and ONNX Runtime backends share one implementation) and picks
the next token.

Semantics follow transformers' logits processors exactly:

- ``repetition_penalty`` (``RepetitionPenaltyLogitsProcessor``): every id present in the
  sequence so far, prompt included (image placeholders too), gets ``s * p`` if its logit is
  negative, else ``s / p``, on float32 logits.
- ``min_new_tokens`` / ``min_length`` (``MinNewTokensLengthLogitsProcessor`` /
  ``MinLengthLogitsProcessor``): the stop ids are banned until enough tokens exist
  (``min_length`` counts the prompt, as in transformers).
- ``suppress_tokens`` / ``begin_suppress_tokens``: banned always / at the first new token.
- ``eos_token_id``: generation also stops at these ids (added to the tokenizer's stop ids).

Settings that only matter when sampling (``temperature``, ``top_k``, ``top_p``, ...) are
ignored, as ``generate(do_sample=False)`` ignores them. Settings that would change a greedy
answer and that this runtime does not implement (beam search, ``no_repeat_ngram_size``,
``bad_words_ids``, forced tokens, ...) are refused with a message naming them: an answer
that silently differs from the reference's is worse than none.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import BundleError, InputError

GENERATION_CONFIG = "generation_config.json"

# Keys whose value at these defaults has no effect; any other value changes greedy output and
# is not implemented here.
_REFUSED_DEFAULTS: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "diversity_penalty": 0.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None, "force_words_ids": None, "constraints": None, "sequence_bias": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "watermarking_config": None, "stop_strings": None, "dola_layers": None,
    "num_return_sequences": 1, "token_healing": False,
}
# Keys that do not change a greedy answer here (sampling knobs, ids for padding, output
# formats, the length bound the runtime takes from fusar.json / --max-new-tokens).
_IGNORED = frozenset("""
do_sample temperature top_k top_p min_p typical_p epsilon_cutoff eta_cutoff top_h
bos_token_id pad_token_id decoder_start_token_id use_cache cache_implementation cache_config
output_attentions output_hidden_states output_scores output_logits return_dict_in_generate
transformers_version _from_model_config max_length max_new_tokens renormalize_logits
remove_invalid_values max_time low_memory early_stopping length_penalty return_legacy_cache
prompt_lookup_num_tokens assistant_confidence_threshold num_assistant_tokens
num_assistant_tokens_schedule assistant_lookbehind target_lookbehind max_matching_ngram_size
is_assistant compile_config disable_compile trust_remote_code generation_kwargs
""".split())


def _ids(value: Any, where: str, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in items):
        raise BundleError(f"{where}: {key}: expected a token id or a list of token ids, got {value!r}")
    return tuple(items)


def _count(value: Any, where: str, key: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleError(f"{where}: {key}: expected a non-negative integer, got {value!r}")
    return value


def check_penalty(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{where}: expected a positive number (1.0 = no penalty), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GenerationSettings:
    """What changes a greedy answer; the defaults are plain greedy decoding."""

    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    min_length: int = 0
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    source: str = "default"
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "GenerationSettings":
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}")
        refused = [f"{k}={data[k]!r}" for k, default in _REFUSED_DEFAULTS.items()
                   if k in data and data[k] != default and data[k] not in (None, [], {})]
        if refused:
            raise BundleError(f"{where}: {', '.join(refused)} would change greedy answers and fusar-edge does not "
                              "implement it; remove it from the file (the answers then differ from transformers' "
                              "generate)")
        penalty = data.get("repetition_penalty", 1.0)
        try:
            penalty = check_penalty(1.0 if penalty is None else penalty, f"{where}: repetition_penalty")
        except InputError as exc:
            raise BundleError(str(exc)) from None
        known = set(_REFUSED_DEFAULTS) | {"repetition_penalty", "eos_token_id", "min_new_tokens", "min_length",
                                          "suppress_tokens", "begin_suppress_tokens"}
        return cls(
            repetition_penalty=penalty,
            eos_token_ids=_ids(data.get("eos_token_id"), where, "eos_token_id"),
            min_new_tokens=_count(data.get("min_new_tokens"), where, "min_new_tokens"),
            min_length=_count(data.get("min_length"), where, "min_length"),
            suppress_tokens=_ids(data.get("suppress_tokens"), where, "suppress_tokens"),
            begin_suppress_tokens=_ids(data.get("begin_suppress_tokens"), where, "begin_suppress_tokens"),
            source=where,
            ignored=tuple(sorted(k for k in data if k not in known and (k in _IGNORED or not k.startswith("_")))),
        )

    @classmethod
    def from_bundle(cls, bundle: str | Path | None) -> "GenerationSettings":
        """The bundle's ``generation_config.json``, or plain greedy when it has none (presets)."""
        if bundle is None or not Path(bundle).is_dir():
            return cls()
        path = Path(bundle) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    def with_penalty(self, penalty: float | None) -> "GenerationSettings":
        """These settings with ``repetition_penalty`` overridden (``--repetition-penalty``)."""
        if penalty is None:
            return self
        return dataclasses.replace(self, repetition_penalty=check_penalty(penalty, "repetition_penalty"),
                                   source=f"{self.source} + repetition_penalty override")

    @property
    def plain(self) -> bool:
        """True when greedy argmax needs no logits step at all."""
        return (self.repetition_penalty == 1.0 and not self.min_new_tokens and not self.min_length
                and not self.suppress_tokens and not self.begin_suppress_tokens)

    def record(self) -> dict[str, Any]:
        """For the answer's ``model`` block."""
        out: dict[str, Any] = {"decoding": "greedy", "repetition_penalty": self.repetition_penalty,
                               "source": self.source}
        for key in ("eos_token_ids", "suppress_tokens", "begin_suppress_tokens"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        for key in ("min_new_tokens", "min_length"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


class GreedyPicker:
    """Picks each next token for one sequence: the settings' logits step, then argmax.

    One per request (it holds the sequence's ids). The argmax runs over every logit, as
    ``generate`` does: real checkpoints pad the embedding beyond the tokenizer, and an id there
    decodes to nothing (it is never likely in a trained model, but excluding it would change
    which token wins and so the answer).
    """

    def __init__(self, settings: GenerationSettings, prompt_ids: Iterable[int], stop_ids: Iterable[int]):
        self.settings = settings
        self.stop_ids = sorted(set(int(i) for i in stop_ids) | set(settings.eos_token_ids))
        prompt = np.asarray([int(i) for i in prompt_ids], dtype=np.int64)
        self.prompt_len, self.generated = len(prompt), 0
        self._seen = np.unique(prompt)  # sorted ids present so far (for the repetition penalty)

    def _banned(self) -> list[int]:
        s = self.settings
        banned = list(s.suppress_tokens)
        if self.generated == 0:
            banned += s.begin_suppress_tokens
        if self.generated < s.min_new_tokens or self.prompt_len + self.generated < s.min_length:
            banned += self.stop_ids
        return banned

    def __call__(self, logits) -> int:
        """``logits`` ``[V]`` (torch tensor or numpy array) -> the next token id."""
        if self.settings.plain:
            token = int(logits.argmax())
        else:
            scores = _to_numpy(logits).astype(np.float32, copy=True)
            penalty = self.settings.repetition_penalty
            if penalty != 1.0:
                seen = self._seen[self._seen < len(scores)]
                picked = scores[seen]
                scores[seen] = np.where(picked < 0, picked * np.float32(penalty), picked / np.float32(penalty))
            banned = [i for i in self._banned() if i < len(scores)]
            if banned:
                scores[banned] = -np.inf
            token = int(scores.argmax())
        self.generated += 1
        if self.settings.repetition_penalty != 1.0:
            pos = np.searchsorted(self._seen, token)
            if pos == len(self._seen) or self._seen[pos] != token:
                self._seen = np.insert(self._seen, pos, token)
        return token

    def is_stop(self, token: int) -> bool:
        return token in self.stop_ids


def _to_numpy(logits) -> np.ndarray:
    if isinstance(logits, np.ndarray):
        return logits
    # a torch tensor (any device/dtype): transformers applies its processors on float32 logits
    return logits.detach().float().cpu().numpy()
