"""Greedy settings from generation_config.json against transformers' own logits processors."""

import json

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from fusar_edge.errors import BundleError, InputError
from fusar_edge.generation import GenerationSettings, GreedyPicker

# Qwen2.5-VL-7B-Instruct's generation_config.json, as published.
QWEN_INSTRUCT = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                 "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                 "top_p": 0.001, "top_k": 1, "transformers_version": "4.49.0"}


def test_qwen_instruct_settings():
    s = GenerationSettings.from_dict(QWEN_INSTRUCT, "generation_config.json")
    assert s.repetition_penalty == 1.05 and s.eos_token_ids == (151645, 151643) and not s.plain
    assert {"temperature", "top_p", "top_k", "do_sample"} <= set(s.ignored)  # greedy ignores them, as generate does
    rec = s.record()
    assert rec["repetition_penalty"] == 1.05 and rec["decoding"] == "greedy" and rec["source"] == "generation_config.json"
    assert s.with_penalty(1.0).plain and "override" in s.with_penalty(1.0).source
    assert GenerationSettings().plain


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_repetition_penalty_matches_transformers(seed, penalty):
    """Fresh logits (both signs) and id histories: the same scores and the same pick as transformers."""
    rng = np.random.default_rng(seed)
    vocab = 500
    prompt = rng.integers(0, vocab, 60).tolist()
    s = GenerationSettings(repetition_penalty=penalty)
    picker = GreedyPicker(s, prompt, stop_ids=[2])
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    history = list(prompt)
    for _ in range(6):
        logits = rng.normal(0, 3, vocab).astype(np.float32)
        ref = hf(torch.tensor([history]), torch.from_numpy(logits.copy())[None])[0]
        token = picker(logits.copy())
        assert token == int(ref.argmax())
        history.append(token)
    # the same history through the picker's state: it kept every id it produced
    assert set(picker._seen.tolist()) == set(history)


def test_torch_logits_are_accepted_and_scored_in_float32():
    s = GenerationSettings(repetition_penalty=1.3)
    logits = torch.tensor([1.0, 5.0, 4.0, -1.0], dtype=torch.bfloat16)
    # id 1 was seen: 5 / 1.3 = 3.85 < 4, so id 2 wins; without the penalty id 1 would
    assert GreedyPicker(s, [1], [0])(logits) == 2
    assert GreedyPicker(GenerationSettings(), [1], [0])(logits) == 1


def test_min_new_tokens_and_suppression_match_transformers():
    rng = np.random.default_rng(3)
    vocab, stop = 50, [2, 0]
    s = GenerationSettings(min_new_tokens=3, suppress_tokens=(7,), begin_suppress_tokens=(9,))
    prompt = [5, 6, 8]
    picker = GreedyPicker(s, prompt, stop)
    history = list(prompt)
    procs = [MinNewTokensLengthLogitsProcessor(len(prompt), 3, stop), SuppressTokensLogitsProcessor([7])]
    for step in range(5):
        logits = rng.normal(0, 1, vocab).astype(np.float32)
        logits[[0, 2, 7]] += 10.0  # the banned ids would win
        if step == 0:
            logits[9] += 20.0
        ref = torch.from_numpy(logits.copy())[None]
        for p in procs:
            ref = p(torch.tensor([history]), ref)
        if step == 0:
            ref[0, 9] = -float("inf")  # begin_suppress at the first new token
        token = picker(logits)
        assert token == int(ref.argmax()), step
        history.append(token)
    new = history[len(prompt):]
    assert not set(new[:3]) & {0, 2, 7} and new[0] != 9 and new[3] in (0, 2)  # a stop wins from the 4th token on


def test_eos_ids_join_the_stop_set_and_argmax_spans_every_logit():
    picker = GreedyPicker(GenerationSettings(eos_token_ids=(7,)), [1, 2], stop_ids=[2])
    assert picker.stop_ids == [2, 7] and picker.is_stop(7) and not picker.is_stop(1)
    # as generate: an id past the tokenizer (a padded embedding row) can win; it decodes to nothing
    assert picker(np.array([0.0, 1.0, 0.0, 0.0, 9.0], dtype=np.float32)) == 4


@pytest.mark.parametrize("bad, words", [
    ({"num_beams": 4}, ["num_beams=4", "greedy"]),
    ({"no_repeat_ngram_size": 3}, ["no_repeat_ngram_size=3"]),
    ({"bad_words_ids": [[5]]}, ["bad_words_ids"]),
    ({"forced_eos_token_id": 2}, ["forced_eos_token_id"]),
    ({"repetition_penalty": -1}, ["repetition_penalty", "-1"]),
    ({"repetition_penalty": "high"}, ["repetition_penalty", "high"]),
    ({"eos_token_id": "x"}, ["eos_token_id"]),
    ({"min_new_tokens": -2}, ["min_new_tokens"]),
])
def test_settings_that_cannot_be_honoured_are_refused(bad, words, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({**QWEN_INSTRUCT, **bad}))
    with pytest.raises(BundleError) as exc:
        GenerationSettings.from_bundle(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "generation_config.json" in msg
    assert all(w in msg for w in words), msg


def test_defaults_that_change_nothing_are_accepted(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 1, "no_repeat_ngram_size": 0,
                                                                "bad_words_ids": None, "max_length": 20}))
    assert GenerationSettings.from_bundle(tmp_path).plain
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        GenerationSettings.from_bundle(tmp_path)
    assert GenerationSettings.from_bundle(tmp_path / "none").plain  # a preset name / no file: plain greedy


def test_penalty_override_is_checked():
    with pytest.raises(InputError, match="repetition_penalty"):
        GenerationSettings().with_penalty(0)
