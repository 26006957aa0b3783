"""Loss-head memory of a KTO step on 30B-class models, naive against fastkto: a formula for the head alone.

    python -m benchmarks.memory_model                          # default models and batch x sequence grid
    python -m benchmarks.memory_model --batch 1,2,4 --seq 4096,8192 --results benchmarks/results/h200/results.json

What it is: the bytes the loss head needs beyond its inputs (hidden states, weights) and the weight gradient
every method returns, for one KTO step, from three closed forms below. What it is not: the memory of a training
step. It leaves out parameters, gradients, optimizer state, FSDP's gathered layers, activations and checkpoints,
and the lifetimes that decide whether the head's temporaries meet the step's peak at all (for a 30B model on 8
GPUs the peak is often the backward tail of the layers, after the head's temporaries are gone). For "will it fit"
use the full-step simulation, ``python -m benchmarks.scale`` (fake tensors, FSDP2, the real transformers model);
its head-only figure (``benchmarks.scale.head_only``) equals the GPU column below within 2%
(``tests/test_scale.py``).

N = batch x sequence tokens, M the scored (completion) tokens, V the vocabulary, D the hidden size; bf16 model,
float32 softmax.

naive     c_naive * N * V bytes. The head keeps a float32 log_softmax (4 bytes per logit) for the backward; the
          backward builds the float32 gradient of the gathered log-probs and of the softmax input beside it
          (4 + 4), and the reference / KL passes build their own logits while the policy's are kept: 12 bytes
          per logit at the peak, in float32 and in bf16 alike (bf16 logits are cast before the softmax and
          not kept). c_naive is measured: the slope of the naive KTO step's peak memory beyond the gradients
          against N * V in a ``python -m benchmarks.run`` results file.
fastkto   W + M * D * b. W: the workspace, a constant (the tiles of the PyTorch path; 64 MiB by default):
          measured, the largest fastkto peak of the KTO step sweep minus its per-token part. M * D * b: the float32
          hidden-state gradient the backward accumulates (b = 4), plus its cast to bf16 (b = 6 in bf16); it grows
          with the scored tokens, not with the vocabulary.
GPU       the Triton path's real buffers, from its own plan (``fastkto.kernels.tiled.plan_tiles`` for the call's
          shape, CUDA's 128 MiB default budget): the float32 hidden gradient (4 M D) with, at the larger of two
          moments, either the plan's workspace (dz tile, the dW chunk's fp32 accumulator: during the tile loop) or
          the bf16 hidden gradient the call returns (2 N D: made after the loop has freed its workspace), plus the
          per-token statistics. Computed, not fitted: a GPU run checks it (``benchmarks/roofline.py --measure``).

The 80 GB column puts this next to a LoRA / frozen-base run on one card: bf16 weights take 2 bytes per
parameter, and what is left must hold the activations and the loss head.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelShape", "MODELS", "Coefficients", "coefficients_from_results", "head_bytes", "table"]

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9
CARD_BYTES = 80 * GB
DEFAULT_WORKSPACE = 64 * 2**20
DEFAULT_GPU_WORKSPACE_MIB = 128  # fastkto.kernels.tiled.DEFAULT_WORKSPACE_MIB["cuda"]
ANALYTIC_C_NAIVE = 12.0  # bytes per (token x vocabulary) logit, derivation in the module docstring


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    vocab: int
    params: float  # total parameters, for the bf16 weight bytes


MODELS = {
    "qwen2.5-32b": ModelShape("Qwen2.5-32B", 5120, 152064, 32.8e9),
    "llama-30b": ModelShape("LLaMA-30B", 6656, 32000, 32.5e9),
}


@dataclass
class Coefficients:
    c_naive: float  # bytes per logit at the naive peak
    workspace: float  # fastkto's constant bytes
    source: str


def _fit_slope(xs, ys) -> float:
    """Least-squares slope of y = a + b x (b alone if one point)."""
    if len(xs) == 1:
        return ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _default_results() -> Path | None:
    """A committed results file: a CUDA machine's when there is one (bf16, the Triton path), else the CPU's."""
    found = sorted(p for p in RESULTS.glob("*/results.json") if not p.parent.name.endswith("-quick"))
    gpu = [p for p in found if json.loads(p.read_text())["machine"]["device"].startswith("cuda")]
    return (gpu or found or [None])[0]


def coefficients_from_results(path: Path | None) -> Coefficients:
    """c_naive and the fastkto workspace measured by the KTO step workload of a results file (analytic values,
    said so in ``source``, when there is none)."""
    if path is None or not Path(path).exists():
        return Coefficients(ANALYTIC_C_NAIVE, DEFAULT_WORKSPACE, "analytic (no results file found)")
    from .report import summarize

    report = json.loads(Path(path).read_text())
    rows = [r for r in summarize(report["raw"]) if r["workload"] == "kto" and r.get("peak_extra_bytes") is not None]
    naive = [r for r in rows if r["method"] == "naive"]
    fast_name = "fastkto-triton" if any(r["method"] == "fastkto-triton" for r in rows) else "fastkto-torch"
    fast = [r for r in rows if r["method"] == fast_name]
    if not naive or not fast:
        return Coefficients(ANALYTIC_C_NAIVE, DEFAULT_WORKSPACE, f"analytic ({path} has no KTO step rows)")
    xs = [r["tokens"] * r["V"] for r in naive]
    c_naive = _fit_slope(xs, [r["peak_extra_bytes"] for r in naive])
    dtype = report["profile"]["dtype"]
    per_token = 4 if dtype == "float32" else 6
    workspace = max(r["peak_extra_bytes"] - per_token * r["scored"] * r["D"] for r in fast)
    try:
        path = Path(path).resolve().relative_to(RESULTS.parent.parent)
    except ValueError:
        pass
    return Coefficients(c_naive, max(workspace, 0.0),
                        f"{path} ({report['machine']['name']}, {dtype}, {fast_name}: {len(naive)} naive and "
                        f"{len(fast)} fastkto KTO-step points)")


def head_bytes(model: ModelShape, batch: int, seq: int, scored_fraction: float, coef: Coefficients,
               dtype_bytes: int = 2) -> tuple[float, float]:
    """(naive, fastkto) loss-head bytes of one KTO step of ``batch`` x ``seq`` tokens."""
    n = batch * seq
    naive = coef.c_naive * n * model.vocab
    fast = coef.workspace + n * scored_fraction * model.hidden * (4 + (dtype_bytes if dtype_bytes != 4 else 0))
    return naive, fast


def gpu_path_bytes(model: ModelShape, batch: int, seq: int, scored_fraction: float) -> float:
    """The Triton path's loss-head bytes for one policy pass (bf16): the fp32 hidden gradient, the larger of the
    plan's workspace (during the tile loop) and the bf16 hidden gradient returned (made after the loop frees the
    workspace), and the per-token statistics; see the module docstring."""
    from .roofline import Shape, plan

    scored = max(1, int(batch * seq * scored_fraction))
    _, _, workspace = plan(Shape(scored, model.hidden, model.vocab), DEFAULT_GPU_WORKSPACE_MIB)
    return scored * model.hidden * 4 + max(workspace, batch * seq * model.hidden * 2) + 64 * scored


def table(models, batches, seqs, scored_fraction, coef) -> list[dict]:
    rows = []
    for key in models:
        m = MODELS[key]
        weights = 2 * m.params
        for b in batches:
            for t in seqs:
                naive, fast = head_bytes(m, b, t, scored_fraction, coef)
                gpu = gpu_path_bytes(m, b, t, scored_fraction)
                rows.append({"model": m.name, "batch": b, "seq": t, "naive_gb": naive / GB, "fastkto_gb": fast / GB,
                             "fastkto_gpu_gb": gpu / GB,
                             "freed_gb": (naive - fast) / GB, "freed_pct_of_80gb": 100 * (naive - fast) / CARD_BYTES,
                             "left_after_bf16_weights_gb": (CARD_BYTES - weights) / GB})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {tuple(MODELS)}")
    p.add_argument("--batch", default="1,4,8", help="micro-batch sizes (sequences)")
    p.add_argument("--seq", default="2048,4096,8192", help="sequence lengths (tokens)")
    p.add_argument("--scored-fraction", type=float, default=1.0,
                   help="scored (completion) share of the tokens; 1.0 is the worst case for fastkto")
    p.add_argument("--results", default=None, help="results.json to take the coefficients from (default: the "
                                                   "committed CUDA results, else the CPU results)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {tuple(MODELS)}")
    coef = coefficients_from_results(Path(args.results) if args.results else _default_results())
    rows = table(models, [int(x) for x in args.batch.split(",")], [int(x) for x in args.seq.split(",")],
                 args.scored_fraction, coef)
    if args.json:
        print(json.dumps({"coefficients": coef.__dict__, "rows": rows}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="KTO step loss-head memory, bf16 (GB = 1e9 bytes)")
    for col in ("model", "batch x seq", "naive GB", "fastkto GB", "fastkto GPU path GB", "freed GB",
                "freed / 80 GB", "80 GB - bf16 weights"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r["model"], f"{r['batch']} x {r['seq']}", f"{r['naive_gb']:.2f}", f"{r['fastkto_gb']:.3f}",
                  f"{r['fastkto_gpu_gb']:.3f}",
                  f"{r['freed_gb']:.2f}", f"{r['freed_pct_of_80gb']:.1f}%", f"{r['left_after_bf16_weights_gb']:.1f}")
    import sys

    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(t)
    console.print(f"naive: {coef.c_naive:.2f} bytes per logit; fastkto workspace {coef.workspace / 2**20:.1f} MiB "
                  f"+ the fp32 hidden-state gradient (scored fraction {args.scored_fraction}); from {coef.source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
