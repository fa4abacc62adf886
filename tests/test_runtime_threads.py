"""One Runtime shared by threads answers exactly as it does alone (torch and ONNX Runtime).

Before the KV cache moved into each request, 4 threads x 20 questions on one torch runtime gave
43/80 wrong answers silently, and onnxruntime raised on 76/80.
"""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusar_edge.data.synth import sample_scene
from fusar_edge.runtime import Runtime

QUESTIONS = ["How many ships are there in this image?", "Where is the ship in this image?",
             "What is the number of oil tanks in this SAR image?"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    # scenes the shipped demo answers differently (3, 4 and 5 ships; their oil-tank counts too), so
    # an answer handed to the wrong request would show
    return [sample_scene(root / f"s{seed}", seed=seed) for seed in (2, 9, 16)]


def _jobs(scenes):
    jobs = [(s["scene_tif"], q, s["anchors"]) for s in scenes for q in QUESTIONS]
    jobs.append((scenes[0]["scene_tif"], "detect ship", scenes[0]["anchors"]))  # a long answer beside short ones
    return jobs


def _answer(rt, job):
    image, question, anchors = job
    task = "detect" if question.startswith("detect") else None
    a = rt.ask(image, "ship" if task else question, anchors=anchors, task=task, label="ship" if task else None)
    return a.text, tuple(a.token_ids)


def _check_threads_match_sequential(rt, scenes, threads=4, repeats=3):
    jobs = _jobs(scenes)
    alone = {i: _answer(rt, job) for i, job in enumerate(jobs)}
    order = [i for i in range(len(jobs)) for _ in range(repeats)]
    random.Random(7).shuffle(order)
    with ThreadPoolExecutor(threads) as pool:
        together = list(pool.map(lambda i: (i, _answer(rt, jobs[i])), order))
    wrong = [(i, got) for i, got in together if got != alone[i]]
    assert not wrong, f"{len(wrong)}/{len(together)} answers differ from the single-threaded ones"
    assert len({alone[i] for i in alone}) > 3  # the questions really have different answers


def test_torch_runtime_is_safe_to_share(scenes):
    _check_threads_match_sequential(Runtime.open(threads=1), scenes)


def test_onnxruntime_runtime_is_safe_to_share(scenes, tmp_path):
    pytest.importorskip("onnxruntime")
    from fusar_edge.export.bundle_export import export_bundle

    out = tmp_path / "demo-onnx"
    export_bundle(None, out, onnx=True, parity_prompts=1)
    _check_threads_match_sequential(Runtime.open(out, backend="onnxruntime", threads=1), scenes)
    # micro-batched decoding on ONNX Runtime (batch dimension of the exported decoder)
    batched = Runtime.open(out, backend="onnxruntime", threads=1).enable_batching(max_batch=8, window_ms=100)
    _check_threads_match_sequential(batched, scenes)
    assert batched.batcher.largest_batch > 1


def test_close_ends_the_batch_threads_and_refuses_later_questions(scenes):
    import threading

    from fusar_edge.errors import FusarError

    s = scenes[0]
    before = {t for t in threading.enumerate() if t.name.startswith("fusar-")}
    with Runtime.open(threads=1).enable_batching(max_batch=2) as rt:
        batch_threads = {t for t in threading.enumerate() if t.name.startswith("fusar-")} - before
        assert len(batch_threads) == 2  # vision and decode
        assert rt.ask(s["scene_tif"], QUESTIONS[0], anchors=s["anchors"]).token_ids
    assert rt.closed and not any(t.is_alive() for t in batch_threads)
    with pytest.raises(FusarError, match="closed"):
        rt.ask(s["scene_tif"], QUESTIONS[0], anchors=s["anchors"])
    rt.close()  # twice: harmless


def test_bad_arguments_are_input_errors_naming_them(scenes):
    from fusar_edge.errors import InputError

    s = scenes[0]
    for threads in (0, -1, "2", 1.5, True):
        with pytest.raises(InputError, match="^threads: "):
            Runtime.open(threads=threads)
    rt = Runtime.open(threads=1)
    for image in (None, 5, b"scene.tif"):
        with pytest.raises(InputError, match="^image: "):
            rt.ask(image, QUESTIONS[0], anchors=s["anchors"])
    for tokens in ("abc", 2.7, True):
        with pytest.raises(InputError, match="^max_new_tokens: "):
            rt.ask(s["scene_tif"], QUESTIONS[0], anchors=s["anchors"], max_new_tokens=tokens)
