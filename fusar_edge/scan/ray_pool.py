"""Scan chips answered by a pool of Ray actors: one model load per worker, across a cluster.

The driver (``fusar-edge scan --ray``) keeps everything a resumed run depends on: it reads the
chips, writes the journal and the outputs; workers only answer. So a Ray run and a local run
share the journal format and write the same outputs, and a run started on Ray can be finished
locally (or the other way round). Chips travel to workers as pixels (a 504-px chip is 0.8 MB,
small beside a second of model time), so scenes need not be on the workers' disks; the bundle
and the AEF tile store must be readable at the same path on every node, as model files are in
any Ray batch-inference job.

Ray's own ``ActorPool`` schedules the chips: each worker holds one chip at a time, and the
driver reads a chip only when a worker is free, so driver memory follows the number of workers,
not the scene.

GPUs: Ray hides every GPU from an actor that did not ask for one (``CUDA_VISIBLE_DEVICES`` is
empty there), so a worker on a GPU node would quietly answer on its CPU. Workers ask for
``gpus_per_worker`` GPUs (``plan_workers``: by default one each whenever the device may be a GPU
and the cluster has GPUs) and open the model on ``cuda``, the GPU Ray gave them.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from ..errors import FusarError, InputError
from .answerers import ChipQuestion, anchor_setting, answer_chip, nodata_record
from .grid import Chip

INSTALL = "Ray is not installed: pip install 'fusar-edge[ray]' (on the driver and every worker)"


class _ChipWorker:
    """A Ray actor: opens the runtime once, then answers chips."""

    def __init__(self, open_kwargs: dict, threads: int):
        from ..runtime import Runtime
        from ..threads import set_torch_threads

        if open_kwargs.get("backend", "torch") == "torch":
            set_torch_threads(threads)
        self.rt = Runtime.open(**open_kwargs, threads=threads)

    def describe(self) -> dict:
        cfg = self.rt.config
        return {"weights": self.rt.weights, "preset": cfg.name, "chip_size": int(cfg.chip_size)}

    def answer(self, chip: Chip, img, q: ChipQuestion) -> dict:
        try:
            return answer_chip(self.rt, chip, img, q)
        except FusarError as exc:  # one line back to the driver, not a remote traceback
            return {"error": "input" if isinstance(exc, InputError) else "fusar", "message": str(exc)}


def plan_workers(cpus: int, gpus: float, threads: int, workers: int | None, gpus_per_worker: float | None,
                 device: str) -> tuple[int, float]:
    """-> (workers, GPUs per worker) for a cluster of ``cpus`` and ``gpus``; a plan the cluster
    cannot hold is an InputError (Ray would leave the extra workers pending and the scan wait)."""
    on_cpu = device == "cpu"
    if gpus_per_worker is None:
        gpus_per_worker = 0.0 if on_cpu or (device == "auto" and gpus == 0) else 1.0
    if on_cpu and gpus_per_worker > 0:
        raise InputError(f"--ray-gpus {gpus_per_worker:g}: the workers run on the CPU (--device cpu)")
    if device.startswith("cuda") and gpus_per_worker == 0:
        raise InputError(f"--device {device} with --ray-gpus 0: Ray would hide the GPUs from the workers")
    n = workers or max(1, cpus // threads)
    if gpus_per_worker > 0 and not workers:
        n = min(n, int(gpus // gpus_per_worker))
    if n * threads > cpus:
        raise InputError(f"--ray-workers {n} x --threads {threads} needs {n * threads} CPUs; the Ray cluster "
                         f"has {cpus}")
    if gpus_per_worker > 0 and (n == 0 or n * gpus_per_worker > gpus + 1e-9):
        n = max(n, 1)
        raise InputError(f"{n} Ray worker(s) x --ray-gpus {gpus_per_worker:g} needs {n * gpus_per_worker:g} GPUs; "
                         f"the Ray cluster has {gpus:g}" + (" (--device cpu to answer on CPUs)" if gpus == 0 else ""))
    return n, gpus_per_worker


class RayAnswerer:
    """Chips answered on a Ray cluster (``address`` None: the cluster this process is already
    connected to, else ``RAY_ADDRESS``, else a local one started here)."""

    def __init__(self, open_kwargs: dict, address: str | None = None, workers: int | None = None,
                 threads: int = 1, gpus_per_worker: float | None = None):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise FusarError(INSTALL) from None
        if not ray.is_initialized():
            try:
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
            except ConnectionError as exc:
                raise FusarError(f"--ray {address}: {_last_line(exc)}") from None
        resources = ray.cluster_resources()
        device = str(open_kwargs.get("device") or "auto")
        n, gpus = plan_workers(int(resources.get("CPU", 1)), float(resources.get("GPU", 0)), threads, workers,
                               gpus_per_worker, device)
        if gpus > 0:  # each worker sees only the GPU(s) Ray gave it: "cuda" is that one
            open_kwargs = {**open_kwargs, "device": "cuda"}
        worker = ray.remote(num_cpus=threads, num_gpus=gpus)(_ChipWorker)
        self.actors = [worker.remote(open_kwargs, threads) for _ in range(n)]
        self._ray = ray
        try:
            seen = ray.get([a.describe.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:  # a worker could not open the model: its own one-line reason
            self.close()
            raise FusarError(f"Ray workers could not open the model: {_last_line(exc)}") from None
        if any(s != seen[0] for s in seen):  # e.g. another bundle at the same path on one node
            raise FusarError(f"Ray workers opened different models: {sorted({s['weights'] for s in seen})}; give "
                             "every node the same bundle")
        self.weights, self.preset, self.chip_size = seen[0]["weights"], seen[0]["preset"], seen[0]["chip_size"]
        self.anchors = anchor_setting(open_kwargs.get("tiles"), open_kwargs.get("allow_empty_anchors", False))
        self.workers = n
        self._pool = ActorPool(self.actors)

    def answer(self, jobs: Iterable[tuple[Chip, object]], q: ChipQuestion) -> Iterator[dict]:
        pool = self._pool
        for chip, img in jobs:
            if img is None:
                yield nodata_record(chip)
                continue
            while not pool.has_free():
                yield self._checked(pool.get_next_unordered())
            pool.submit(lambda actor, job: actor.answer.remote(*job), (chip, img, q))
        while pool.has_next():
            yield self._checked(pool.get_next_unordered())

    @staticmethod
    def _checked(record: dict) -> dict:
        if "error" in record:
            raise (InputError if record["error"] == "input" else FusarError)(record["message"])
        return record

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []


def _last_line(exc: BaseException) -> str:
    """A remote error's last line (Ray wraps it in the worker's traceback)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])  # "fusar_edge.errors.BundleError: ..." -> "..."
