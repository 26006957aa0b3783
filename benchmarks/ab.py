"""Two fastkto checkouts timed against each other, interleaved, on one KTOLoss step (the quickest honest before/after).

    git worktree add --detach /tmp/fastkto-base <commit>
    python -m benchmarks.ab /tmp/fastkto-base . [--rounds 7] [--busy 1] [--tokens 256] [--out FILE]

Each round runs one subprocess per checkout (``PYTHONPATH`` set to it), alternating which goes first, and each
subprocess times ``--repeats`` KTOLoss forward + backward calls (SmolLM2-135M's head: D = 576, V = 49152, float32,
4 rows, the first half of each row a prompt, reference and KL passes) after a warm-up, reporting its median wall
time and median process CPU time (on an oversubscribed host the CPU time moves less with the other tenants' load).
Interleaving spreads the host's drift over both sides; the result is the median over rounds of each side and
their ratio, with the range of the per-round ratios. ``--busy N`` keeps N processes spinning for the whole run (a
shared machine), process i pinned to core i. ``os.getloadavg()`` is recorded before and after every subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r"""
import statistics, sys, time, torch
import fastkto
from fastkto.loss import KTOLoss
tokens, repeats = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
rows, dim, vocab = 4, 576, 49152
h = torch.randn(rows, tokens, dim, generator=g)
w = torch.randn(vocab, dim, generator=g) / dim ** 0.5
y = torch.randint(0, vocab, (rows, tokens), generator=g)
y[:, : tokens // 2] = -100
des = torch.tensor([True, False, True, False])
loss_fn = KTOLoss(backend="torch")
def step():
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = loss_fn(hl, wl, y, des, ref_hidden=h * 0.9, ref_weight=w, kl_hidden=h.roll(1, 0), kl_labels=y.roll(1, 0),
                  kl_ref_hidden=h)
    out.loss.backward()
step()
times, cpu = [], []
for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time(); step()
    times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
print(statistics.median(times), statistics.median(cpu), fastkto.__file__)
"""


def _time(checkout: str, tokens: int, repeats: int) -> tuple[float, float]:
    root = Path(checkout).resolve()
    # a src/ layout checkout (since the move) or a flat one (older commits)
    env = {**os.environ, "PYTHONPATH": str(root / "src" if (root / "src" / "fastkto").is_dir() else root)}
    # run from elsewhere: "python -c" puts the working directory (a checkout, maybe) first on sys.path
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tokens), str(repeats)], env=env, check=True, cwd="/",
                         capture_output=True, text=True).stdout.split()
    if not out[2].startswith(str(Path(checkout).resolve())):
        raise RuntimeError(f"{checkout}: imported fastkto from {out[2]}")
    return float(out[0]), float(out[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--busy", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from .measure import busy_cores

    load_start, loads = os.getloadavg(), []
    with busy_cores(args.busy):
        times, cpu = {"base": [], "new": []}, {"base": [], "new": []}
        for r in range(args.rounds):
            order = ("base", "new") if r % 2 == 0 else ("new", "base")
            for side in order:
                before = os.getloadavg()
                wall, used = _time(getattr(args, side), args.tokens, args.repeats)
                times[side].append(wall)
                cpu[side].append(used)
                loads.append({"round": r, "side": side, "before": before, "after": os.getloadavg()})
    base, new = statistics.median(times["base"]), statistics.median(times["new"])
    ratios = [n / b for b, n in zip(times["base"], times["new"], strict=True)]
    report = {"command": "python -m benchmarks.ab " + " ".join(argv if argv is not None else sys.argv[1:]),
              "base": args.base, "new": args.new, "busy": args.busy, "tokens_per_row": args.tokens,
              "load_average_start": load_start, "load_average_end": os.getloadavg(), "loads": loads,
              "seconds": times, "cpu_seconds": cpu, "median_cpu_base_s": statistics.median(cpu["base"]),
              "median_cpu_new_s": statistics.median(cpu["new"]), "median_base_s": base, "median_new_s": new,
              "ratio_new_over_base": new / base, "round_ratios": ratios, "ratio_spread": [min(ratios), max(ratios)],
              "spread_base": [min(times["base"]), max(times["base"])],
              "spread_new": [min(times["new"]), max(times["new"])], "when": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
