"""CPU worker threads: the vocabulary in shards, one per thread, for the forward and the backward alike.

Measured on 2 cores with a busy process on one of them (torch.profiler, N=1024, D=576, V=49152): the tile loop's
parallel regions slow down 2.6x (7 ms products) to 140x (a 0.1 ms scatter) while a few large GEMMs slow down
1.4x. A parallel region ends when its slowest thread does, and a thread that shares its core with another
process is off the CPU for a scheduler slice (milliseconds) at a time; a region of a few milliseconds then waits
for it, however little work it has left. Long independent threads do not wait: the scheduler gives each its
fair share over hundreds of milliseconds. So on the CPU the loops run on vocabulary shards, one per worker
thread, each thread's operations single-threaded (or, with many cores, a few threads each), one join per call.
Each shard is the whole tile loop on a slice of the weight, as a vocab-parallel rank would run it: its own
workspace and, in the backward, its own (M, D) hidden-gradient partial (shard 0 writes the gradient itself),
merged in shard order. The calling thread allocates every buffer (workspaces, partials, outputs, the shards'
labels): the profiler's allocation tracking, which fastkto.memory and the benchmarks use on the CPU, follows only
the thread it runs on; inside the workers only the tiles' small vectors are allocated (a few words per token row
and per vocabulary row of a tile, counted in the plan as ``tiled.VECTORS``).

Shards are whole chunks of the tile maker's CPU tile (``TileMaker.cpu_tile``), so a shard's chunks are the
chunks one thread would take.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import tiled

__all__ = ["Shard", "forward_workers", "backward_workers", "per_worker_budget", "shards", "on_threads",
           "vocab_sharded"]

MIN_WORKER_BYTES = 16 << 20  # a worker's workspace: the measured-best tile (4 MiB) and its operand buffers
_POOL: list = [None]
_POOL_LOCK = threading.Lock()


def _chunk(maker: tiled.TileMaker) -> int:
    assert maker.cpu_tile is not None, "CPU threads shard by the tile maker's CPU tile"
    return maker.cpu_tile[1]


def forward_workers(call: tiled.CallShape, maker: tiled.TileMaker) -> int:
    """Worker threads (vocabulary shards) of a CPU forward: torch's thread count, capped by the vocabulary's
    chunks. Unlike the backward's, it does not depend on the token count (the forward keeps no (M, D) partial), so
    that the shards, and how a token's statistics merge, are the same whatever the batch."""
    if call.device_type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), -(-call.vocab // _chunk(maker))))


def backward_workers(call: tiled.CallShape, budget: int, maker: tiled.TileMaker) -> int:
    """Worker threads for a CPU backward: torch's thread count, capped by the vocabulary's chunks and by the budget
    (each worker needs ``MIN_WORKER_BYTES`` of workspace, each one beyond the first an (M, D) fp32 partial)."""
    if call.device_type != "cpu":
        return 1
    workers = max(1, min(torch.get_num_threads(), -(-call.vocab // _chunk(maker))))
    while workers > 1 and (workers - 1) * call.tokens * call.dim * 4 + workers * MIN_WORKER_BYTES > budget:
        workers -= 1
    return workers


def per_worker_budget(call: tiled.CallShape, budget: int, workers: int) -> int:
    """A backward worker's workspace budget: the budget less the other workers' (M, D) fp32 partials, shared."""
    return (budget - (workers - 1) * call.tokens * call.dim * 4) // workers


def shards(vocab: int, workers: int, maker: tiled.TileMaker) -> list[tuple[int, int]]:
    """Contiguous vocabulary ranges, whole chunks of the CPU tile each, as equal as the chunks allow."""
    chunk = _chunk(maker)
    chunks = -(-vocab // chunk)
    per = -(-chunks // workers) * chunk
    return [(v0, min(v0 + per, vocab)) for v0 in range(0, vocab, per)]


def on_threads(workers: int, fn: Callable, spans: list[tuple[int, int]]) -> list:
    """fn(i, v0, v1) for every shard i on the worker threads, results in shard order. Each worker sets its own thread
    count for its operations (torch's setting is per thread) and restores the caller's afterwards, so that the
    process setting is left as it was; gradient mode is off (the caller's autograd Function owns the graph)."""
    threads = torch.get_num_threads()
    each = max(1, threads // workers)
    with _POOL_LOCK:
        if _POOL[0] is None or _POOL[0]._max_workers < workers:
            _POOL[0] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastkto")
        pool = _POOL[0]

    def job(i, v0, v1):
        torch.set_num_threads(each)
        try:
            with torch.no_grad():
                return fn(i, v0, v1)
        finally:
            torch.set_num_threads(threads)

    futures = [pool.submit(job, i, v0, v1) for i, (v0, v1) in enumerate(spans)]
    return [f.result() for f in futures]


@dataclass(frozen=True)
class Shard:
    """One worker's slice of a call: vocabulary rows v0:v1 of the weight and bias, the labels as rows of that
    slice, and the workspace the calling thread made for it."""

    index: int
    v0: int
    v1: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    workspace: tiled.Workspace


def vocab_sharded(weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, workers: int,
                  maker: tiled.TileMaker, make_workspace: Callable[..., tiled.Workspace],
                  run: Callable[[Shard], object]) -> list:
    """``run(shard)`` for each of ``workers`` vocabulary shards on the worker threads, results in shard order.

    weight (V, D), bias (V,) or None, labels (M,) int64 as rows of weight. On the calling thread, before any
    worker starts: each shard's slices and labels (labels - v0), then each shard's workspace,
    ``make_workspace(weight, bias, labels)`` of the shard's slices.
    """
    spans = shards(weight.shape[0], workers, maker)
    args = [(weight[v0:v1], None if bias is None else bias[v0:v1], labels - v0) for v0, v1 in spans]
    spaces = [make_workspace(w, b, y) for w, b, y in args]
    parts = [Shard(i, v0, v1, *args[i], spaces[i]) for i, (v0, v1) in enumerate(spans)]
    return on_threads(workers, lambda i, v0, v1: run(parts[i]), spans)
