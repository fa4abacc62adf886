"""Default thread counts: the physical cores we may use, within a cgroup CPU quota."""

from fusar_edge import threads as T


def _topology(root, pairs):
    for cpu, (pkg, core) in enumerate(pairs):
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{pkg}\n")
        (d / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_hyperthread_siblings_once(tmp_path):
    _topology(tmp_path, [(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1)])  # 2 packages, SMT on package 0
    assert T.physical_cores([0, 1, 2, 3, 4, 5], tmp_path) == 4
    assert T.physical_cores([0, 2], tmp_path) == 1  # two siblings of one core
    assert T.physical_cores([0, 9], tmp_path) == 2  # unreadable topology: count the CPUs


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert T.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert T.cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert T.cgroup_cpu_limit(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert T.cgroup_cpu_limit(v1) is None


def test_default_threads_respects_quota_share_and_load(monkeypatch):
    monkeypatch.setattr(T, "allowed_cpus", lambda: list(range(16)))
    monkeypatch.setattr(T, "physical_cores", lambda cpus: 8)
    monkeypatch.setattr(T, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(T, "runnable_others", lambda: 0)
    assert T.default_threads() == 8 and T.default_threads(share=3) == 2 and T.default_threads(share=20) == 1
    monkeypatch.setattr(T, "cgroup_cpu_limit", lambda: 2.5)
    assert T.default_threads() == 3  # a 2.5-CPU quota runs 3 threads, not 8
    assert T.resolve_threads(5) == 5 and T.resolve_threads(None) == 3
    monkeypatch.setattr(T, "runnable_others", lambda: 1)  # one core kept busy by other work
    assert T.default_threads() == 2 and T.resolve_threads(4) == 4
    for busy in (3, 50):  # never below one thread
        monkeypatch.setattr(T, "runnable_others", lambda: busy)
        assert T.default_threads() == 1
    monkeypatch.setattr(T, "runnable_others", lambda: None)  # unknown (not Linux): the cores we may use
    assert T.default_threads() == 3


import pytest  # noqa: E402


@pytest.mark.parametrize("argv", [["ask", "x.tif", "q"], ["eval", "--data", "x", "--out", "y"],
                                  ["scan", "x.tif", "--out", "o"], ["serve"], ["bench"]])
@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_threads_must_be_a_positive_integer_everywhere(argv, bad, capsys, tmp_path, monkeypatch):
    from fusar_edge.cli import main

    monkeypatch.chdir(tmp_path)  # a relative --out would land here: nothing may be written

    assert main([*argv, "--threads", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--threads: expected a positive integer, got '{bad}'" in err[0]
    assert not any(tmp_path.iterdir())


def test_others_running_reads_the_runnable_count(tmp_path):
    from fusar_edge.threads import others_running

    f = tmp_path / "loadavg"
    f.write_text("0.52 0.40 0.31 1/211 4242\n")  # only the reader runs
    assert others_running(samples=3, interval_s=0, loadavg=f) is False
    f.write_text("1.90 1.20 0.80 3/211 4242\n")  # two more threads want a CPU
    assert others_running(samples=3, interval_s=0, loadavg=f) is True
    assert T.runnable_others(samples=3, interval_s=0, loadavg=f) == 2
    f.write_text("garbage\n")
    assert others_running(samples=3, interval_s=0, loadavg=f) is None
    assert T.runnable_others(samples=3, interval_s=0, loadavg=f) is None
    assert others_running(samples=1, interval_s=0, loadavg=tmp_path / "missing") is None


@pytest.mark.parametrize("setting,busy,decoder,others", [
    ("auto", False, True, False), ("auto", True, False, False), ("auto", None, False, False),
    ("0", False, False, False), ("decoder", True, True, False), ("1", True, True, True)])
def test_spin_policy_follows_the_setting_and_the_load(monkeypatch, setting, busy, decoder, others):
    """auto (the default): the decoder's workers spin only when nobody else is running; an unknown
    answer (None: not Linux) counts as busy."""
    pytest.importorskip("onnxruntime")
    from fusar_edge.backends import onnxruntime as backend

    monkeypatch.setattr(backend, "others_running", lambda: busy)
    policy = backend.spin_policy(setting)
    assert set(policy) == set(backend.STAGES)
    assert policy["decoder"] is decoder
    assert all(policy[s] is others for s in backend.STAGES if s != "decoder")


def test_bad_spin_setting_is_one_line():
    pytest.importorskip("onnxruntime")
    from fusar_edge.backends.onnxruntime import spin_policy
    from fusar_edge.errors import InputError

    with pytest.raises(InputError, match="FUSAR_ORT_SPIN: expected auto, 0, 1 or decoder, got 'sometimes'"):
        spin_policy("sometimes")


def test_a_machine_reading_is_reused_for_a_second(tmp_path, monkeypatch):
    """Default threads and the spin policy both ask at start: this machine's /proc/loadavg is sampled
    once per READING_VALID_S; another file (tests, other readers) is always read afresh."""
    f = tmp_path / "loadavg"
    f.write_text("0.5 0.4 0.3 3/211 4242\n")
    monkeypatch.setattr(T, "LOADAVG", f)
    monkeypatch.setattr(T, "_LAST_READING", None)
    assert T.runnable_others(samples=1, interval_s=0, loadavg=f) == 2
    f.write_text("0.5 0.4 0.3 1/211 4242\n")
    assert T.runnable_others(samples=1, interval_s=0, loadavg=f) == 2  # within the second: reused
    assert T.runnable_others(samples=1, interval_s=0, loadavg=tmp_path / "loadavg2") is None  # other file
    monkeypatch.setattr(T, "READING_VALID_S", 0.0)
    assert T.runnable_others(samples=1, interval_s=0, loadavg=f) == 0  # expired: sampled again
