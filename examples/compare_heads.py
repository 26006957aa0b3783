#!/usr/bin/env python
"""Compare two runs of examples/train.py step by step (e.g. ``--head naive`` and ``--head fastkto``, same seed).

    python examples/compare_heads.py RUN_NAIVE RUN_FASTKTO [--out compare.md]

Prints (and with --out writes) a markdown table: each step's loss and mean chosen (desirable) policy log-prob under
both heads with their differences (at step 1 the policy equals the reference, so the loss is a constant and the
log-probs are the real check), and each step's peak memory with the ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def steps(run: Path) -> dict[int, dict]:
    with open(run / "log.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def table(a: Path, b: Path) -> str:
    ra, rb = steps(a), steps(b)
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    lines = [
        f"| step | loss ({ca['head']}) | loss ({cb['head']}) | abs diff | chosen logps ({ca['head']}) "
        f"| abs diff | peak MiB ({ca['head']}) | peak MiB ({cb['head']}) | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(set(ra) & set(rb)):
        x, y = ra[s], rb[s]
        ma, mb = x.get("peak_mem_mib"), y.get("peak_mem_mib")
        ratio = f"{mb / ma:.2f}" if ma and mb else "-"
        lp_a, lp_b = x.get("train/logps/chosen"), y.get("train/logps/chosen")
        lp = f"{lp_a:.4f} | {abs(lp_a - lp_b):.1e}" if lp_a is not None and lp_b is not None else "- | -"
        lines.append(
            f"| {s} | {x['train/loss']:.7f} | {y['train/loss']:.7f} | {abs(x['train/loss'] - y['train/loss']):.1e} "
            f"| {lp} | {ma if ma is not None else '-'} | {mb if mb is not None else '-'} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    text = table(args.run_a, args.run_b)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
