"""Stage timing and peak memory for the benchmark.

``StageClock`` takes back-to-back marks: a stage's time is the gap between its mark and the
one before, so the stages of a run cover it without gaps or overlaps. On a GPU every mark
first records a CUDA event and waits for it (work queued by the stage is finished before the
host clock is read), and the events also give each stage's device-side time.
"""

from __future__ import annotations

import os
import threading
import time

_CLOCK = time.perf_counter


def timer_resolution_ms() -> float:
    """The finer of the clock's stated resolution and its measured tick (back-to-back reads)."""
    stated = time.get_clock_info("perf_counter").resolution
    ticks = []
    for _ in range(200):
        a = _CLOCK()
        b = _CLOCK()
        while b == a:
            b = _CLOCK()
        ticks.append(b - a)
    return max(stated, min(ticks)) * 1e3


class StageClock:
    def __init__(self, cuda_device=None):
        """``cuda_device``: a torch CUDA device whose work is synchronised at every mark."""
        self.cuda_device = cuda_device
        self.stages: list[tuple[str, float]] = []  # (stage, wall ms) in run order
        self.device_ms: list[tuple[str, float]] = []
        self._events: list = []
        self._t0 = self._last = None

    def _event(self):
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.cuda_device))
        event.synchronize()
        return event

    def start(self) -> float:
        if self.cuda_device is not None:
            self._events = [("start", self._event())]
        self._t0 = self._last = _CLOCK()
        return self._t0

    def mark(self, stage: str) -> float:
        """End ``stage`` now; -> its wall time in ms."""
        if self.cuda_device is not None:
            self._events.append((stage, self._event()))
        now = _CLOCK()
        ms = (now - self._last) * 1e3
        self.stages.append((stage, ms))
        self._last = now
        return ms

    def elapsed_ms(self) -> float:
        """From ``start`` to the last mark, read off the raw timestamps (not summed from the stages)."""
        return (self._last - self._t0) * 1e3

    def finish(self) -> None:
        """Turn the recorded CUDA events into per-stage device times (``device_ms``)."""
        self.device_ms = [(name, prev.elapsed_time(ev)) for (_, prev), (name, ev)
                          in zip(self._events, self._events[1:])]

    def totals(self) -> dict[str, float]:
        """Wall ms per stage name, summed over repeated marks (decode steps)."""
        out: dict[str, float] = {}
        for name, ms in self.stages:
            out[name] = out.get(name, 0.0) + ms
        return out


def _rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux/BSD


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak host RSS and device memory during a block.

    Host: the kernel's own peak mark (VmHWM, reset on entry), exact and free; where it cannot
    be reset, a thread samples the RSS every 20 ms. A sampler must stay rare: on a 2-core
    machine one waking every 2 ms made torch's 2-thread prefill twice as slow.
    Device: torch's ``max_memory_allocated`` for torch backends; for others on a GPU (ONNX
    Runtime's own allocator) the device-wide used memory, sampled every 20 ms, above its level
    at entry.
    """

    def __init__(self, cuda_device=None, torch_allocator: bool = True, interval: float = 0.02):
        self.cuda_device, self.torch_allocator, self.interval = cuda_device, torch_allocator, interval
        self.host_mb = self.device_mb = None
        self.host_start_mb = None
        self._stop = threading.Event()
        self._thread = None
        self._kernel_peak = False
        self._device_used_peak = self._device_used_start = 0

    def _device_used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.cuda_device)
        return total - free

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._kernel_peak:
                self.host_mb = max(self.host_mb, _rss_mb())
            if self.cuda_device is not None and not self.torch_allocator:
                self._device_used_peak = max(self._device_used_peak, self._device_used())

    def __enter__(self) -> "PeakMemory":
        self.host_start_mb = self.host_mb = round(_rss_mb(), 1)
        self._kernel_peak = _reset_peak_rss() and _peak_rss_mb() is not None
        sample_device = self.cuda_device is not None and not self.torch_allocator
        if self.cuda_device is not None:
            import torch

            if self.torch_allocator:
                torch.cuda.reset_peak_memory_stats(self.cuda_device)
            else:
                self._device_used_start = self._device_used_peak = self._device_used()
        if not self._kernel_peak or sample_device:
            self._thread = threading.Thread(target=self._sample, name="fusar-bench-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = _peak_rss_mb() if self._kernel_peak else None
        self.host_mb = round(max(self.host_mb, _rss_mb(), peak or 0.0), 1)
        if self.cuda_device is not None:
            import torch

            if self.torch_allocator:
                self.device_mb = round(torch.cuda.max_memory_allocated(self.cuda_device) / 2**20, 1)
            else:
                peak = max(self._device_used_peak, self._device_used())
                self.device_mb = round((peak - self._device_used_start) / 2**20, 1)
