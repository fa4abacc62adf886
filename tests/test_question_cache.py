"""GRASP's question cache: a hit gives the answer no cache gives, the pass is skipped, memory is bounded."""

import threading

import pytest
import torch

from fusar_edge.data.synth import sample_scene
from fusar_edge.question_cache import QuestionCache
from fusar_edge.runtime import Runtime


def test_lru_is_bounded_and_evicts_the_least_recently_used():
    cache, calls = QuestionCache(2), []

    def enc(v):
        return lambda: calls.append(v) or torch.tensor([float(v)])

    a = cache.get(torch.tensor([1, 2]), enc(1))
    assert cache.get(torch.tensor([1, 2]), enc(99)) is a  # the very tensor of the miss
    cache.get([3], enc(3))
    cache.get(torch.tensor([1, 2]), enc(99))  # touch: [1, 2] is now the most recent
    cache.get([4], enc(4))  # evicts [3]
    assert len(cache) == 2 and calls == [1, 3, 4] and (cache.hits, cache.misses) == (2, 3)
    cache.get([3], enc(5))
    assert calls[-1] == 5 and len(cache) == 2
    cache.clear()
    cache.get([3], enc(8))
    assert calls[-1] == 8 and len(cache) == 1
    off = QuestionCache(0)
    off.get([1], enc(6)), off.get([1], enc(7))
    assert calls[-2:] == [6, 7] and len(off) == 0
    with pytest.raises(ValueError):
        QuestionCache(-1)


def test_threads_share_the_cache_safely():
    cache = QuestionCache(8)
    results = []

    def work(k):
        for i in range(200):
            results.append(int(cache.get([i % 12], lambda: torch.tensor([float(i % 12)]))[0]) == i % 12)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(results) and len(results) == 800 and len(cache) <= 8


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return sample_scene(tmp_path_factory.mktemp("qcache") / "s", seed=3)


def test_a_cached_question_answers_as_an_uncached_one(scene, monkeypatch):
    rt = Runtime.open("tiny", threads=1)  # random weights, GRASP on: the question pass runs
    assert rt.model.grasp is not None
    cold = Runtime.open("tiny", threads=1)
    cold.stages.questions = QuestionCache(0)  # the reference: every question encoded afresh
    questions = ["How many ships are there?", "Where is the ship?", "How many ships are there?"]
    passes = {"n": 0}
    real = rt.model.question_vector

    def counted(ids):
        passes["n"] += 1
        return real(ids)

    monkeypatch.setattr(rt.model, "question_vector", counted)
    for q in questions:
        a = rt.ask(scene["scene_tif"], q, anchors=scene["anchors"], max_new_tokens=6)
        b = cold.ask(scene["scene_tif"], q, anchors=scene["anchors"], max_new_tokens=6)
        assert a.token_ids == b.token_ids and a.grasp_weights == b.grasp_weights
    assert passes["n"] == 2 and rt.stages.questions.hits == 1  # the repeat skipped the pass
