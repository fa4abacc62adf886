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
    assert rt.vision_batcher.largest_batch > 1, "no two images went through the ViT together"
    assert any(a.model.get("vision_batch", 0) > 1 for a in got)
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


def test_batched_vision_gives_each_image_its_own_tokens(scenes):
    # the fast path (one ViT call over many chips) against the plain one (one call per chip)
    import torch

    rt = Runtime.open(threads=1)
    items = []
    for s in scenes[:4]:
        req = rt.prepare(s["scene_tif"], QUESTION)
        anchors, _ = rt.anchor_tensors(s["anchors"], req.image)
        items.append((req.pixels, req.grid_thw, anchors))
    items.append((items[0][0], items[0][1], None))  # one without anchors in the same batch
    with torch.inference_mode():
        together = rt.stages.vision_batch(items)
        for (px, grid, anchors), tokens in zip(items, together):
            alone = rt.stages.vision(px, grid, anchors)
            assert tokens.shape == alone.shape
            assert torch.allclose(tokens, alone, atol=1e-4, rtol=1e-4), float((tokens - alone).abs().max())
    assert not torch.allclose(together[0], together[-1])  # the anchors made a difference
