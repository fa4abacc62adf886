"""native/edgellm_runner: the Edge-LLM runner's host rules (C++) against fusar-edge's Python references.

The runner itself (fusar_sar_runner.cpp, fusar_edgellm_run.cpp) needs TensorRT Edge-LLM's C++
runtime, TensorRT and CUDA, none of which build here. What it decides on the host does not:
fusar_layout.cpp reads fusar_edgellm.json, builds the chat ids, places the multimodal rows,
computes the M-RoPE positions, the pixel patches, TLM's anchor matrix and the question mask.
This test compiles that file with g++ (a few seconds), runs it on a manifest written by the
export's own ``manifest()`` for the 128-wide `tiny` model, and compares every result with the
Python function it mirrors. Skips, saying why, without a C++ compiler.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "native" / "edgellm_runner"
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build native/edgellm_runner's host code")


@pytest.fixture(scope="module")
def layout_check(tmp_path_factory):
    exe = tmp_path_factory.mktemp("runner") / "layout_check"
    subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                    str(SRC / "fusar_layout.cpp"), str(SRC / "layout_check.cpp"), "-o", str(exe)], check=True)
    return exe


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """fusar_edgellm.json as the export writes it (manifest() over real export_graphs specs)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_edgellm import wide_tiny_config

    from fusar_edge.export import edgellm
    from fusar_edge.export.edgellm_graphs import MAX_QUESTION_TOKENS, export_graphs
    from fusar_edge.model.bundle import build_random

    model = build_random(wide_tiny_config()).eval()
    out = tmp_path_factory.mktemp("edgellm")
    graphs = export_graphs(model, out, torch.float16, max_anchors=32)
    spec = edgellm.manifest(model, tiny_tokenizer, graphs, {"dir": "checkpoint"}, MAX_QUESTION_TOKENS, 32)
    path = out / edgellm.MANIFEST_NAME
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return model, spec, path


def _run(exe, manifest, request: dict, tmp_path) -> dict:
    req = tmp_path / "request.json"
    req.write_text(json.dumps(request))
    done = subprocess.run([str(exe), str(manifest), str(req)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _request(model, tokenizer, prompt: str, tmp_path, *, anchors=None, pad_to=0, question_tokens=()) -> dict:
    from fusar_edge.export.onnx_stages import synthetic_chip

    cfg = model.config
    pieces = ["system\n" + cfg.system_prompt, "\n", "user\n", "assistant\n", prompt]
    chip = synthetic_chip(cfg.chip_size, 3)
    (tmp_path / "chip.rgb").write_bytes(np.ascontiguousarray(chip, np.uint8).tobytes())
    pos, mask = anchors if anchors is not None else (np.zeros((0, 2)), np.zeros(0))
    return {"prompt": prompt, "encodings": {p: tokenizer.encode(p) for p in pieces}, "pad_to": pad_to,
            "chip": str(tmp_path / "chip.rgb"), "patches_out": str(tmp_path / "patches.f32"),
            "anchor_positions": [float(v) for v in np.asarray(pos, np.float32).ravel()],
            "anchor_mask": [int(v) for v in np.asarray(mask).ravel()], "weights_out": str(tmp_path / "weights.f32"),
            "question_tokens": list(question_tokens)}


def test_every_manifest_key_the_runner_reads_is_written_by_the_export(layout_check, exported):
    _, spec, _ = exported
    keys = subprocess.run([str(layout_check), "--keys"], capture_output=True, text=True, check=True).stdout.split()
    assert len(keys) > 20
    for key in keys + ["engines/grasp.onnx/inputs"]:  # grasp.onnx: read when GRASP is on (it is here)
        node = spec
        for part in key.split("/"):
            assert isinstance(node, dict) and part in node, f"runner reads {key!r}; the export does not write it"
            node = node[part]


def test_ids_rows_and_positions_match_the_python_join(layout_check, exported, tiny_tokenizer, tmp_path):
    from fusar_edge import tasks
    from fusar_edge.export import edgellm
    from fusar_edge.model.rope import mrope_positions
    from fusar_edge.tokenizer import build_sequence

    model, spec, path = exported
    cfg = model.config
    question = "How many ships are in this image?"
    prompt = tasks.build_prompt(tasks.infer_task(question), question)
    got = _run(layout_check, path, _request(model, tiny_tokenizer, prompt, tmp_path, pad_to=300), tmp_path)

    seq = build_sequence(tiny_tokenizer, prompt, cfg.num_visual_tokens, cfg.grasp.prompt_len, cfg.system_prompt)
    lay = seq.layout
    assert got["manifest"]["T"] == cfg.num_visual_tokens and got["manifest"]["P"] == cfg.grasp.prompt_len == 1
    assert got["ids"] == seq.input_ids.tolist()  # the chat sequence, piece by piece == the whole string
    assert got["question_ids"] == seq.question_ids.tolist()
    assert got["layout"] == [lay.image_start, lay.image_len, lay.prompt_start, lay.prompt_len]
    vocab = spec["sequence"]["vocab_size"]
    assert got["explicit"] == edgellm.join_reference(seq.input_ids, lay, vocab).tolist()
    counting = np.array(got["counting"])
    rows = np.array(got["rows"])
    assert (counting[rows >= 0] == spec["sequence"]["image_token_id"]).all()
    assert (counting[rows < 0] == seq.input_ids[rows < 0]).all()
    # the counting form numbers image_token_id positions 0.. in order: the explicit form's rows
    order = np.cumsum(counting == spec["sequence"]["image_token_id"]) - 1
    assert (order[rows >= 0] == rows[rows >= 0]).all()
    assert (np.array(got["explicit"])[rows >= 0] - vocab == rows[rows >= 0]).all()

    n = len(seq.input_ids)
    want, nxt = mrope_positions(n, lay.image_start, cfg.token_grid)
    pos = np.array(got["positions"]).reshape(3, got["positions_length"])
    assert got["positions_length"] == 300 and got["next"] == nxt
    assert np.array_equal(pos[:, :n], want[:, 0])
    assert np.array_equal(pos[:, n:], np.broadcast_to(np.arange(nxt, nxt + 300 - n), (3, 300 - n)))


def test_patches_anchor_weights_and_question_mask_match_python(layout_check, exported, tiny_tokenizer, tmp_path):
    from fusar_edge.backends.tlm_host import tlm_weights_numpy
    from fusar_edge.export.onnx_stages import synthetic_anchors, synthetic_chip
    from fusar_edge.model.preprocess import chip_to_patches

    model, spec, path = exported
    cfg = model.config
    _, pos, mask = (t.numpy() for t in synthetic_anchors(20, 7, masked=3))
    got = _run(layout_check, path, _request(model, tiny_tokenizer, "What is this?", tmp_path, anchors=(pos, mask),
                                            question_tokens=[1, 17, 256, 257]), tmp_path)
    want, _ = chip_to_patches(synthetic_chip(cfg.chip_size, 3), 14, 2, 2)
    patches = np.fromfile(tmp_path / "patches.f32", np.float32).reshape(want.shape)
    assert np.array_equal(patches, want)  # same float32 operations in the same order: bit for bit

    s = spec["anchors"]["max_anchors"]
    weights = np.fromfile(tmp_path / "weights.f32", np.float32).reshape(cfg.num_visual_tokens, s)
    ref = tlm_weights_numpy(pos, mask, cfg.patch_grid, cfg.token_grid, cfg.tlm.sigma, cfg.tlm.eps)
    np.testing.assert_allclose(weights[:, :len(mask)], ref, rtol=0, atol=1e-6)
    assert not weights[:, len(mask):].any()  # columns past the set: zero (= masked)
    assert not weights[:, np.flatnonzero(mask == 0)].any()

    q = spec["question_pass"]["max_tokens"]
    masks = got["question_masks"]
    assert masks[:3] == [{"rows": q, "ones": 1}, {"rows": q, "ones": 17}, {"rows": q, "ones": 256}]
    assert "257 tokens" in masks[3]["refused"] and "never cut" in masks[3]["refused"]


def test_manifest_reader_names_what_is_missing(layout_check, exported, tiny_tokenizer, tmp_path):
    model, spec, _ = exported
    broken = json.loads(json.dumps(spec))
    del broken["sequence"]["image_token_id"]
    (tmp_path / "m.json").write_text(json.dumps(broken))
    (tmp_path / "r.json").write_text(json.dumps(_request(model, tiny_tokenizer, "x", tmp_path)))
    done = subprocess.run([str(layout_check), str(tmp_path / "m.json"), str(tmp_path / "r.json")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "$.sequence.image_token_id: missing" in done.stderr


@pytest.mark.parametrize("source", ["fusar_sar_runner.cpp", "fusar_edgellm_run.cpp"])
def test_runner_sources_pass_a_syntax_check_against_the_declared_api(source):
    """The Edge-LLM side compiles (-fsyntax-only) against syntax_stubs/: declarations of the
    Edge-LLM 0.11.0, TensorRT and CUDA API it uses, as read in their sources. This catches a
    runner edit that breaks its own C++ or drifts from those signatures (``override`` included);
    it says nothing about the real headers or behaviour (syntax_stubs/README.md)."""
    done = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                           "-I", str(SRC / "syntax_stubs"), "-I", str(ROOT / "native" / "tiles"), str(SRC / source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
