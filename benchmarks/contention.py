"""What a core taken by another process does to the PyTorch path: time and per-operation profile, quiet and busy.

    python -m benchmarks.contention                          # SmolLM2's head, 1024 tokens, float32
    python -m benchmarks.contention --out benchmarks/results/cpu-2core-contention/current.json
    # the design before the CPU worker threads, for comparison (any fastkto checkout on PYTHONPATH):
    git worktree add /tmp/fastkto-73638b7 73638b7
    PYTHONPATH=/tmp/fastkto-73638b7 python benchmarks/contention.py --out .../73638b7.json

For each condition (a quiet machine; ``--busy`` processes spinning on a core each) it times the primitive's
forward + backward (``fastkto.fused_logprobs(..., backend="torch")``) and the naive head (materialized logits,
float32 log_softmax) with torch's default threads, median of ``--repeats`` after a warm-up, then profiles one
fastkto pass with ``torch.profiler``: per operation, its calls and time per call. A parallel region waits for its
slowest thread, so the operations that slow down most under contention are the short ones. The profiler sees
only the calling thread: with fastkto's CPU worker threads (which run the shards' operations) the profile shows
the calling thread's share, and the wall time is the measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _inputs(tokens, dim, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    grad = torch.randn(tokens, generator=g)
    return hidden, weight, labels, grad


def _passes(hidden, weight, labels, grad):
    import fastkto
    from fastkto import reference

    def fastkto_pass():
        hidden.grad = weight.grad = None
        fastkto.fused_logprobs(hidden, weight, labels, backend="torch").backward(grad)

    def naive_pass():
        hidden.grad = weight.grad = None
        reference.logprobs(hidden, weight, labels, dtype=torch.float32, upcast="logits").backward(grad)

    return {"fastkto": fastkto_pass, "naive": naive_pass}


def _time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _profile(fn, top):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = []
    for e in prof.key_averages():
        if e.key.startswith("aten::") and e.count:
            rows.append({"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                         "ms_per_call": e.self_cpu_time_total / 1e3 / e.count})
    rows.sort(key=lambda r: -r["self_ms"])
    return rows[:top]


def measure(tokens, dim, vocab, busy, repeats, top=12) -> dict:
    hidden, weight, labels, grad = _inputs(tokens, dim, vocab)
    passes = _passes(hidden, weight, labels, grad)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        out = {"busy_processes": busy}
        for name, fn in passes.items():
            med, times = _time(fn, repeats)
            out[f"{name}_s"], out[f"{name}_times_s"] = med, times
        out["fastkto_vs_naive"] = out["fastkto_s"] / out["naive_s"]
        out["profile"] = _profile(passes["fastkto"], top)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--busy", type=int, default=1, help="busy processes in the second condition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    import fastkto

    report = {"command": "python -m benchmarks.contention " + " ".join(sys.argv[1:] if argv is None else argv),
              "fastkto": str(Path(fastkto.__file__).parent), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
              "shape": {"tokens": args.tokens, "dim": args.dim, "vocab": args.vocab, "dtype": "float32"},
              "conditions": [measure(args.tokens, args.dim, args.vocab, b, args.repeats) for b in (0, args.busy)]}
    quiet, busy = report["conditions"]
    print(f"fastkto from {report['fastkto']}, torch {report['torch']}, {report['threads']} threads, "
          f"N={args.tokens} D={args.dim} V={args.vocab} float32")
    for c in report["conditions"]:
        print(f"  {c['busy_processes']} busy: fastkto {c['fastkto_s']:.3f} s, naive {c['naive_s']:.3f} s "
              f"({c['fastkto_vs_naive']:.2f}x)")
    print(f"  {'op (calling thread)':<28} {'calls':>6} {'ms/call quiet':>14} {'ms/call busy':>13} {'x':>6}")
    busy_ops = {r["op"]: r for r in busy["profile"]}
    for r in quiet["profile"]:
        b = busy_ops.get(r["op"])
        if b:
            print(f"  {r['op']:<28} {r['calls']:>6} {r['ms_per_call']:>14.3f} {b['ms_per_call']:>13.3f} "
                  f"{b['ms_per_call'] / r['ms_per_call']:>6.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
