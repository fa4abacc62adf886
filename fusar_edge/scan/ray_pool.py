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


class RayAnswerer:
    """Chips answered on a Ray cluster (``address`` None: the cluster this process is already
    connected to, else ``RAY_ADDRESS``, else a local one started here)."""

    def __init__(self, open_kwargs: dict, address: str | None = None, workers: int | None = None,
                 threads: int = 1):
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
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = workers or max(1, cpus // threads)
        if n * threads > cpus:  # Ray would leave the extra workers pending and the scan would wait forever
            raise InputError(f"--ray-workers {n} x --threads {threads} needs {n * threads} CPUs; the Ray cluster "
                             f"has {cpus}")
        worker = ray.remote(num_cpus=threads)(_ChipWorker)
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
