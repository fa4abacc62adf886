"""Micro-batched decoding: concurrent questions share prefill and decode steps, and answer as alone."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from fusar_edge.data.synth import sample_scene
from fusar_edge.runtime import Runtime

QUESTION = "How many ships are there in this image?"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    return [sample_scene(root / f"s{seed}", seed=seed) for seed in range(6)]


def _ask(rt, scene, question=QUESTION, **kw):
    return rt.ask(scene["scene_tif"], question, anchors=scene["anchors"], **kw)


def test_concurrent_questions_decode_in_batches_and_answer_as_alone(scenes):
    alone = Runtime.open(threads=1)
    want = [_ask(alone, s) for s in scenes]
    detect = _ask(alone, scenes[0], "ship", task="detect", label="ship")  # a longer answer, other length

    rt = Runtime.open(threads=1).enable_batching(max_batch=8, window_ms=200)  # a wide window: batches must form
    jobs = [(s, QUESTION, {}) for s in scenes] + [(scenes[0], "ship", {"task": "detect", "label": "ship"})]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: _ask(rt, j[0], j[1], **j[2]), jobs))
    assert rt.batcher.largest_batch > 1, "no two questions were decoded together"
    assert any(a.model.get("decode_batch", 0) > 1 for a in got)
    # the same-length count questions shared steps; the detection prompt (another length) ran alone
    assert got[-1].model["decode_batch"] == 1 and got[-1].token_ids == detect.token_ids
    for a, w in zip(got, want):
        assert a.token_ids == w.token_ids and a.answer == w.answer


def test_one_question_at_a_time_is_the_unbatched_path(scenes):
    alone, batched = Runtime.open(threads=1), Runtime.open(threads=1).enable_batching(window_ms=0)
    for s in scenes[:2]:
        a, b = _ask(alone, s, max_new_tokens=3), _ask(batched, s, max_new_tokens=3)
        assert a.token_ids == b.token_ids and b.model["decode_batch"] == 1
    assert "decode_batch" not in a.model
