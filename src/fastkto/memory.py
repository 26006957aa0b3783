"""Peak-memory measurement for tests and benchmarks, on CUDA and on the CPU.

CUDA: the caching allocator's ``max_memory_allocated``. CPU: PyTorch has no allocator statistics there, so the
profiler's allocation events are replayed: each event carries the allocator's running total, whose maximum over
the region is the peak. Both count live tensor bytes, not what the OS or the caching allocator hold in reserve.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["PeakMemory", "track_peak_memory"]


@dataclass
class PeakMemory:
    """Bytes allocated when the region began, and the peak allocated above that baseline during it."""

    baseline: int = 0
    peak: int = 0

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


@contextlib.contextmanager
def track_peak_memory(device: torch.device | str = "cpu"):
    """``with track_peak_memory(dev) as m: ...`` then ``m.peak`` is the peak extra bytes of tensors allocated
    inside the block (above what was live when it began). ``device``: a cpu or cuda device (ValueError otherwise:
    the CPU profiler would report the CPU's allocations for it)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device.type!r}")
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak = torch.cuda.max_memory_allocated(device) - result.baseline
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = []

    def walk(node):
        if node.tag == torch._C._profiler._EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return
    events.sort()
    # the total before the first event is the baseline; the running total's maximum is the peak
    first_time, first_size, first_total = events[0]
    result.baseline = first_total - first_size
    result.peak = max(total for _, _, total in events) - result.baseline
