"""Time and peak memory of one workload point, on the CPU and on CUDA.

Time: the median of ``repeats`` forward + backward passes after ``warmup`` passes; CUDA events on a GPU,
``time.perf_counter`` on the CPU.

Memory: one more pass per point, after the timing passes, measures all of the following at once, each above
what was live when the pass began (the inputs):

* peak_bytes: CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor bytes);
  CPU, the process's peak resident set. On Linux that is exact: writing "5" to ``/proc/self/clear_refs``
  resets the high-water mark ``VmHWM`` of ``/proc/self/status`` to the current RSS; elsewhere a thread samples
  the RSS every millisecond (psutil). Freed memory must go back to the OS for the RSS to fall between passes,
  so the memory passes run after the timing passes with glibc's mmap threshold lowered (``mallopt``, the
  runtime form of ``MALLOC_MMAP_THRESHOLD_``) and the heap trimmed before each pass; the timing passes keep
  glibc's default (a dynamic threshold that lets small tiles reuse heap memory, as a training process does).
  It includes the gradients the pass creates.
* alloc_peak_bytes: the tensor-level peak from the profiler's allocation events, computed as
  ``fastkto.memory.track_peak_memory`` computes it (tests/test_benchmarks.py holds them equal).
* peak_extra_bytes: "the peak extra memory beyond the gradients any method must hold": from the same events,
  the peak over time of (live tensor bytes - gradient bytes live at that moment), a gradient counting from the
  allocation of the block that ends as ``.grad``. Subtracting the final gradients from the overall peak
  instead would be wrong when the peak comes before the gradients exist (the naive head's softmax backward).
  Device-side workspaces that bypass PyTorch's allocator would not show here; the RSS / CUDA peak would.

Conditions and details: ``busy_cores`` spins processes beside a measurement (a core taken by another program);
``op_profile`` lists the operations of one pass (``torch.profiler``), to see which ones a busy core slows down.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

__all__ = ["CpuPeakRSS", "lower_mmap_threshold", "time_passes", "memory_pass", "allocator_peaks", "grad_bytes",
           "clear_grads"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers
_M_TRIM_THRESHOLD = -1
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name)
            lib.mallopt, lib.malloc_trim  # noqa: B018 - glibc only
            _libc = lib
        except (OSError, AttributeError, TypeError):
            _libc = False
    return _libc or None


def lower_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap, so freeing it returns it to the OS."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(nbytes))
    libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(nbytes))
    return True


def _trim() -> None:
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


class CpuPeakRSS:
    """Peak resident set size of this process over a region: exact VmHWM on Linux, sampled elsewhere."""

    def __init__(self):
        self.exact = self._can_reset()
        self._stop = None
        self._peak = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    @classmethod
    def _can_reset(cls) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            cls._status("VmHWM")
            return True
        except OSError:
            return False
        except KeyError:
            return False

    @classmethod
    def current(cls) -> int:
        try:
            return cls._status("VmRSS")
        except (OSError, KeyError):
            import psutil

            return psutil.Process().memory_info().rss

    def start(self) -> None:
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return
        import psutil

        proc, self._peak, self._stop = psutil.Process(), 0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, proc.memory_info().rss)
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Peak RSS in bytes since ``start``."""
        if self.exact:
            return self._status("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self._peak, self.current())


def clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def grad_bytes(leaves) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(point, device: torch.device, warmup: int, repeats: int) -> dict:
    """Run ``warmup`` untimed then ``repeats`` timed passes: {"time_s": median, "times_s": all, "warmup_s"}."""
    warm = []
    for _ in range(warmup):
        clear_grads(point.leaves)
        _sync(device)
        t0 = time.perf_counter()
        point.run()
        _sync(device)
        warm.append(time.perf_counter() - t0)
    times = []
    for _ in range(repeats):
        clear_grads(point.leaves)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            point.run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            point.run()
            times.append(time.perf_counter() - t0)
    clear_grads(point.leaves)
    return {"time_s": statistics.median(times), "times_s": times, "warmup_s": warm}


def _allocation_events(prof, device: torch.device) -> list[tuple[int, int, int, int]]:
    """(time, address, size (negative: a free), total allocated after it) of each allocation on ``device``."""
    events = []

    def walk(node):
        if node.tag == torch._C._profiler._EventType.Allocation:
            f = node.extra_fields
            if f.device.type == device.type:
                events.append((node.start_time_ns, f.ptr, f.alloc_size, f.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort(key=lambda e: e[0])
    return events


def allocator_peaks(events, grads: dict[int, int]) -> tuple[int | None, int | None]:
    """(tensor-level peak, peak extra beyond the gradients) from ``_allocation_events``.

    The first is ``fastkto.memory.track_peak_memory``'s computation: the running total's maximum above the
    total before the first event. The second subtracts the gradients live at each moment; ``grads`` maps each
    final ``.grad``'s address to its bytes, and a gradient counts from the last block allocated at its address
    (the one still live at the end). (None, None) without events.
    """
    if not events:
        return None, None
    last_alloc = {ptr: i for i, (_, ptr, size, _) in enumerate(events) if size > 0 and ptr in grads}
    grad_at = {i: grads[ptr] for ptr, i in last_alloc.items()}
    baseline = events[0][3] - events[0][2]
    live_grads, peak, extra = 0, 0, 0
    for i, (_, _, _, total) in enumerate(events):
        live_grads += grad_at.get(i, 0)
        peak = max(peak, total - baseline)
        extra = max(extra, total - baseline - live_grads)
    return peak, extra


def memory_pass(point, device: torch.device, allocator: bool = True) -> dict:
    """One pass's memory above what was live when it began: "peak_bytes" (CPU: resident set, ``CpuPeakRSS``;
    CUDA: the allocator's max), "grad_bytes", and with ``allocator`` (the pass then runs under the profiler,
    whose event records add well under a MiB) "alloc_peak_bytes" and "peak_extra_bytes" (``allocator_peaks``).
    """
    from torch.profiler import ProfilerActivity, profile

    clear_grads(point.leaves)
    _trim()
    meter = CpuPeakRSS() if device.type == "cpu" else None
    if meter is not None:
        base = meter.current()
        meter.start()
    else:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if allocator else None
    with profiler or contextlib.nullcontext():
        point.run()
        _sync(device)
    if meter is not None:
        peak = meter.stop() - base
        method = "VmHWM (exact)" if meter.exact else "RSS sampled every 1 ms"
    else:
        peak = torch.cuda.max_memory_allocated(device) - base
        method = "torch.cuda.max_memory_allocated"
    grads = {t.grad.data_ptr(): t.grad.numel() * t.grad.element_size() for t in point.leaves if t.grad is not None}
    out = {"peak_bytes": peak, "peak_method": method, "grad_bytes": sum(grads.values())}
    if allocator:
        out["alloc_peak_bytes"], out["peak_extra_bytes"] = allocator_peaks(_allocation_events(profiler, device),
                                                                           grads)
        out["extra_method"] = "allocator events"
        if out["peak_extra_bytes"] is None:  # no allocation events for this device: a lower bound instead
            out["peak_extra_bytes"] = peak - out["grad_bytes"]
            out["extra_method"] = "peak minus the final gradients (a lower bound: no allocator events)"
    clear_grads(point.leaves)
    return out


def process_info() -> dict:
    return {"pid": os.getpid(), "threads": torch.get_num_threads()}


@contextlib.contextmanager
def busy_cores(n: int):
    """``n`` processes spinning for as long as the block runs, process i pinned to core i of this process's cores
    (a core taken by another program, as on a shared laptop or CI runner); yields the pinned cores, kills the
    processes on exit, whatever the block raised."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    pinned = [cores[i % len(cores)] for i in range(n)]
    code = "import os, sys\nif hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {int(sys.argv[1])})\n" \
           "while True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(core)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for core in pinned]
    try:
        yield pinned
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def op_profile(point, top: int = 12) -> list[dict]:
    """The ``top`` aten operations of one pass by self time: {op, calls, self_ms, ms_per_call}.

    ``torch.profiler`` sees the calling thread only: with fastkto's CPU worker threads (which run the shards'
    operations) it shows the calling thread's share, and the wall time stays the measure. A parallel region waits
    for its slowest thread, so under a busy core the short operations are the ones whose time per call grows."""
    from torch.profiler import ProfilerActivity, profile

    clear_grads(point.leaves)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        point.run()
    clear_grads(point.leaves)
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "ms_per_call": e.self_cpu_time_total / 1e3 / e.count}
            for e in prof.key_averages() if e.key.startswith("aten::") and e.count]
    return sorted(rows, key=lambda r: -r["self_ms"])[:top]
