#!/usr/bin/env python
"""Plot a run of examples/train.py: ``python examples/plot.py RUN_DIR [--out FILE.png]``.

Four panels from RUN_DIR/log.jsonl: training loss; training reward margin (desirable minus undesirable, per
batch); held-out rewards of chosen and rejected completions with their margin; held-out pair accuracy and the
step's peak memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path) -> list[dict]:
    with open(run / "log.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot(run: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(run)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax[0, 0].plot(*series(rows, "train/loss"), marker=".")
    ax[0, 0].set(title="training loss", xlabel="step")
    ax[0, 1].plot(*series(rows, "train/rewards/margins"), marker=".", color="tab:purple")
    ax[0, 1].axhline(0, color="gray", lw=0.5)
    ax[0, 1].set(title="training reward margin (batch)", xlabel="step")
    for key, label in (("eval/rewards/chosen", "chosen"), ("eval/rewards/rejected", "rejected"),
                       ("eval/rewards/margins", "margin (chosen - rejected)")):
        ax[1, 0].plot(*series(rows, key), marker="o", label=label)
    ax[1, 0].axhline(0, color="gray", lw=0.5)
    ax[1, 0].set(title="held-out implicit rewards", xlabel="step")
    ax[1, 0].legend()
    # at step 0 the policy is the reference: every reward is 0 and no pair counts as won (strict >, as TRL)
    acc = [r for r in rows if r["step"] > 0]
    ax[1, 1].plot(*series(acc, "eval/rewards/accuracies"), marker="o", color="tab:green", label="pair accuracy")
    ax[1, 1].set(title="held-out accuracy and peak memory", xlabel="step", ylabel="accuracy")
    mem = ax[1, 1].twinx()
    mem.plot(*series(rows, "peak_mem_mib"), ".", color="tab:gray", label="peak MiB (step)")
    mem.set_ylabel("peak memory of the step (MiB)")
    ax[1, 1].legend(loc="upper left")
    mem.legend(loc="lower right")
    title = f"{config.get('loss', '?').upper()} with the {config.get('head', '?')} head"
    if config:
        title += f": batch {config['batch']}, lr {config['lr']}, beta {config['beta']}, seed {config['seed']}"
    fig.suptitle(title)
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default RUN/curves.png")
    args = p.parse_args(argv)
    print(plot(args.run, args.out or args.run / "curves.png"))


if __name__ == "__main__":
    main()
