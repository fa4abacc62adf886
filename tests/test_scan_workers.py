"""The chips of a scan answered in batches, or by Ray workers, give the local run's outputs."""

import json
from pathlib import Path

import pytest

from fusar_edge.cli import main
from fusar_edge.config import PRESETS
from fusar_edge.data.synth import sample_scene
from fusar_edge.scan.run import OUTPUTS


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return sample_scene(tmp_path_factory.mktemp("scan_workers"), seed=11, size=448)


@pytest.fixture(scope="module")
def local_run(scene, tmp_path_factory):
    """The reference: the built-in demo, one chip at a time, one thread (as each Ray worker runs)."""
    out = tmp_path_factory.mktemp("local")
    assert main(["scan", str(scene["scene_tif"]), "--out", str(out), "--tiles", str(scene["tiles"]),
                 "--overlap", "32", "--threads", "1", "--quiet"]) == 0
    return out / "scene"


def _outputs(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


def test_batched_chips_answer_as_the_local_run(scene, local_run, tmp_path):
    assert main(["scan", str(scene["scene_tif"]), "--out", str(tmp_path), "--tiles", str(scene["tiles"]),
                 "--overlap", "32", "--threads", "1", "--batch", "4", "--quiet"]) == 0
    rows = [json.loads(s) for s in (tmp_path / "scene" / "chips.jsonl").read_text().splitlines()]
    want = [json.loads(s) for s in (local_run / "chips.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and [r["status"] for r in rows] == ["done"] * 9
    # the same answers chip for chip (a greedy near-tie could break the other way in a batch:
    # `batching`'s note; none does on this scene)
    assert [r["text"] for r in rows] == [r["text"] for r in want]
    assert _outputs(tmp_path / "scene") == _outputs(local_run)


def test_batch_and_ray_flags_are_checked(scene, tmp_path, capsys):
    base = ["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--no-anchors", "--quiet"]
    assert main(base + ["--ray", "--batch", "2"]) == 2
    assert "--batch applies to this process" in capsys.readouterr().err
    assert main(base + ["--ray-workers", "2"]) == 2
    assert capsys.readouterr().err.strip() == "fusar-edge: error: --ray-workers: only with --ray"
    # `--ray A.tif B.tif`: the optional ADDRESS took a scene
    assert main(["scan", "--out", str(tmp_path / "o"), "--ray", str(scene["scene_tif"]), str(scene["scene_tif"]),
                 "--quiet"]) == 2
    assert "that is a file, not a Ray address" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fusar-edge[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_ray_run_writes_the_local_runs_outputs_and_shares_its_journal(scene, local_run, local_ray, tmp_path,
                                                                         capsys):
    args = ["scan", str(scene["scene_tif"]), "--out", str(tmp_path), "--tiles", str(scene["tiles"]),
            "--overlap", "32", "--threads", "1", "--quiet"]
    assert main(args + ["--ray", "--ray-workers", "2"]) == 0
    assert _outputs(tmp_path / "scene") == _outputs(local_run)
    # the journal is the driver's: a Ray run resumed locally (or the other way) finishes it
    journal = tmp_path / "scene" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:5]) + "\n")  # as if killed after 4 chips
    for name in OUTPUTS:
        (tmp_path / "scene" / name).unlink()
    assert main(args) == 0
    assert _outputs(tmp_path / "scene") == _outputs(local_run)


def test_a_ray_worker_that_cannot_open_the_model_is_one_line(scene, local_ray, tmp_path, capsys):
    assert main(["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--no-anchors", "--quiet",
                 "--bundle", str(tmp_path / "no-bundle"), "--ray", "--ray-workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fusar-edge: error: Ray workers could not open the model: {tmp_path / 'no-bundle'}: not a "
                   f"directory (expected a bundle directory or one of: {', '.join(PRESETS)})"]


def test_more_ray_workers_than_the_cluster_has_cpus_is_refused(scene, local_ray, tmp_path, capsys):
    # Ray would leave the extra workers pending, and the scan would wait for them forever
    assert main(["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--no-anchors", "--quiet",
                 "--ray", "--ray-workers", "2", "--threads", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("fusar-edge: error: --ray-workers 2 x --threads 2 needs 4 CPUs; the "
                                               "Ray cluster has 2")
    # GPU workers on a cluster without GPUs: refused, not left pending (nor quietly run on CPUs)
    assert main(["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--no-anchors", "--quiet",
                 "--ray", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("fusar-edge: error: 1 Ray worker(s) x --ray-gpus 1 needs 1 GPUs; the Ray "
                                               "cluster has 0 (--device cpu to answer on CPUs)")
    assert not (tmp_path / "o").exists()


def test_ray_workers_ask_for_the_gpus_they_use():
    """Ray hides GPUs from an actor that asked for none: the plan gives workers GPUs when they may
    use one, sizes the pool by them, and refuses what the cluster cannot hold (one line)."""
    from fusar_edge.errors import InputError
    from fusar_edge.scan.ray_pool import plan_workers

    assert plan_workers(16, 0, 1, None, None, "auto") == (16, 0.0)  # a CPU cluster: as before
    assert plan_workers(16, 4, 2, None, None, "auto") == (4, 1.0)  # one worker per GPU
    assert plan_workers(16, 4, 2, None, 0.5, "cuda") == (8, 0.5)  # two per GPU
    assert plan_workers(16, 4, 2, None, None, "cpu") == (8, 0.0)  # told the CPU: no GPU asked for
    assert plan_workers(16, 4, 1, 3, None, "cuda:1") == (3, 1.0)
    for args, words in [((16, 0, 1, None, None, "cuda"), ["needs", "has 0", "--device cpu"]),
                        ((16, 2, 1, 3, 1.0, "auto"), ["3 Ray worker(s) x --ray-gpus 1 needs 3 GPUs", "has 2"]),
                        ((16, 4, 1, None, 1.0, "cpu"), ["--ray-gpus 1", "--device cpu"]),
                        ((16, 4, 1, None, 0.0, "cuda"), ["--ray-gpus 0", "hide the GPUs"]),
                        ((4, 4, 2, 3, None, "auto"), ["needs 6 CPUs", "has 4"])]:
        with pytest.raises(InputError) as exc:
            plan_workers(*args)
        assert all(w in str(exc.value) for w in words) and "\n" not in str(exc.value), (args, exc.value)


def test_ray_gpus_flag_is_checked(scene, tmp_path, capsys):
    base = ["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--no-anchors", "--quiet"]
    assert main(base + ["--ray-gpus", "1"]) == 2
    assert capsys.readouterr().err.strip() == "fusar-edge: error: --ray-gpus: only with --ray"
    for bad in ("-1", "2", "nan"):
        assert main(base + ["--ray", "--ray-gpus", bad]) == 2
        assert f"expected a share of one GPU, 0 to 1, got {float(bad)}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
