"""The edge runtime: `ask --backend onnxruntime` runs with torch and transformers unimportable.

The edge install (`pip install fusar-edge`) has numpy, onnxruntime, tokenizers and rasterio,
no torch: what runs there is proven here by a subprocess in which importing torch,
transformers, peft or safetensors fails, and every attempt to import them is recorded (an
attempt hidden by an ``except ImportError`` would still be a dependency).
"""

import json
import subprocess
import sys

import pytest

from fusar_edge.export.bundle_export import write_manifest
from fusar_edge.export.onnx_stages import export_stages
from fusar_edge.model.bundle import save_bundle

HEAVY = ("torch", "transformers", "peft", "safetensors", "triton", "onnx", "onnxscript")

# A meta-path finder refuses the heavy packages and records every attempt.
NO_TORCH = f"""
import importlib.abc, json, sys
HEAVY = {HEAVY!r}
attempts = []
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)  # as on the edge install
        return None
sys.meta_path.insert(0, Refuse())
from fusar_edge.cli import main
code = main(sys.argv[1:])
sys.stderr.write("\\nATTEMPTS " + json.dumps(sorted(set(attempts))) + "\\n")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, tiny_tokenizer):
    bundle = save_bundle(tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("edge") / "bundle")
    export_stages(tiny_model, bundle / "onnx")
    write_manifest(bundle)
    return bundle


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from fusar_edge.geo.synthetic import write_demo_scene

    return write_demo_scene(tmp_path_factory.mktemp("edge_scene"), size=128, seed=5)


def _ask_without_torch(*argv):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=300)
    attempts = json.loads(proc.stderr.rsplit("ATTEMPTS ", 1)[1]) if "ATTEMPTS " in proc.stderr else None
    return proc, attempts


def test_ask_onnxruntime_imports_no_torch_and_answers_as_torch(exported, scene, tiny_model):
    from fusar_edge.runtime import Runtime

    question = "How many ships are there?"
    proc, attempts = _ask_without_torch("ask", str(scene["scene_tif"]), question, "--bundle", str(exported),
                                        "--backend", "onnxruntime", "--anchors", str(scene["anchors"]),
                                        "--max-new-tokens", "8", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert attempts == []
    edge = json.loads(proc.stdout.splitlines()[0])
    assert edge["model"]["backend"] == "onnxruntime" and edge["anchor"]["tlm"] == "applied"
    ref = Runtime.open(exported).ask(scene["scene_tif"], question, anchors=scene["anchors"], max_new_tokens=8)
    assert edge["token_ids"] == ref.token_ids and edge["text"] == ref.text


def test_eval_onnxruntime_runs_without_torch(exported, scene, tmp_path):
    import shutil
    from pathlib import Path

    for key in ("scene_tif", "anchors"):
        shutil.copy(scene[key], tmp_path / Path(scene[key]).name)
    rows = [{"id": i, "image": Path(scene["scene_tif"]).name, "aef": Path(scene["anchors"]).name, "question": q, "answer": a,
             "coordinate_size": 224} for i, (q, a) in enumerate([("How many ships are there?", "2"),
                                                                   ("Where is the ship?", "top-left")])]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc, attempts = _ask_without_torch("eval", str(exported), "--data", str(tmp_path / "rows.jsonl"), "--backend",
                                        "onnxruntime", "--out", str(tmp_path / "ev"), "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert attempts == []
    assert len((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()) == 2


def test_edge_errors_stay_one_line_without_torch(exported, tmp_path):
    proc, attempts = _ask_without_torch("ask", str(tmp_path / "missing.tif"), "How many ships?", "--bundle",
                                        str(exported), "--backend", "onnxruntime")
    assert proc.returncode == 2 and attempts == []
    assert proc.stderr.startswith("fusar-edge: error: image ") and "missing.tif" in proc.stderr


def test_torch_backend_without_torch_says_what_to_install(exported, scene):
    proc, _ = _ask_without_torch("ask", str(scene["scene_tif"]), "How many ships?", "--bundle", str(exported),
                                 "--anchors", str(scene["anchors"]))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.splitlines()[0]
    assert "torch" in line and "--backend onnxruntime" in line and "fusar-edge[torch]" in line


def test_offline_wheelhouse_install_runs_without_torch(exported, scene, tmp_path):
    """README's offline install: a wheelhouse made with network, installed with --no-index into a
    fresh virtualenv: no torch arrives, and `ask --backend onnxruntime` answers."""
    import os
    import venv
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    house, env = tmp_path / "wheelhouse", tmp_path / "edge-venv"
    made = subprocess.run(["bash", str(root / "scripts" / "make_wheelhouse.sh"), str(house)], capture_output=True,
                          text=True, timeout=900)
    if made.returncode != 0 and ("NewConnectionError" in made.stderr or "No matching distribution" in made.stderr):
        pytest.skip(f"no package index reachable to fill the wheelhouse: {made.stderr.strip().splitlines()[-1]}")
    assert made.returncode == 0, made.stderr
    venv.create(env, with_pip=True)
    bindir = env / "bin"
    installed = subprocess.run([str(bindir / "pip"), "install", "--quiet", "--no-index", "--find-links", str(house),
                                "fusar-edge"], capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr
    probe = subprocess.run([str(bindir / "python"), "-c", "import importlib.util as u; "
                            "print([m for m in ('torch', 'transformers', 'peft') if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stderr
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    ans = subprocess.run([str(bindir / "fusar-edge"), "ask", str(scene["scene_tif"]), "How many ships are there?",
                          "--bundle", str(exported), "--backend", "onnxruntime", "--anchors", str(scene["anchors"]),
                          "--max-new-tokens", "4", "--threads", "1", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=run_env)
    assert ans.returncode == 0, ans.stderr
    assert json.loads(ans.stdout.splitlines()[0])["model"]["backend"] == "onnxruntime"


def test_info_runs_on_the_edge_and_torch_commands_name_their_install(exported, tmp_path):
    """A field machine can inspect the bundle it was given; what needs torch says which install."""
    proc, attempts = _ask_without_torch("info", str(exported), "--json")
    assert proc.returncode == 0, proc.stderr
    assert attempts == [] and "onnx" in json.loads(proc.stdout)["backends"]
    for argv in (["export", str(exported), "--out", str(tmp_path / "x")], ["bench", "--threads", "1"],
                 ["train", "--stage", "0", "--data", "x.jsonl", "--out", str(tmp_path / "t")]):
        proc, _ = _ask_without_torch(*argv)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("ATTEMPTS")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert len(lines) == 1 and "pip install 'fusar-edge[torch]'" in lines[0], (argv, lines)
