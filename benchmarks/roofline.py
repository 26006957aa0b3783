"""A cost model of fastkto's GPU path (Triton backend, H200), step by step, to hold against a GPU run.

    python -m benchmarks.roofline                                  # the three reference shapes
    python -m benchmarks.roofline --shape 8192,4096,128256 --softcap 30 --budget-mib 128
    python -m benchmarks.roofline --json                           # the same as JSON rows
    python -m benchmarks.roofline --measure --out DIR              # on CUDA: every step timed next to its prediction

The plan is fastkto's own: the tile shape comes from ``fastkto.kernels.tiled.plan_tiles`` with the GPU kernel's
block alignment, so the model follows the code. A call of N scored tokens, hidden size D, vocabulary V, bf16
inputs, a trainable head (dH and dW), runs these steps:

    forward    _logprob_fwd_kernel      2NDV flops: logits tiles on chip, online log-sum-exp
    recompute  _logprob_dz_kernel       2NDV flops, once per (n x v) tile: dz written in bf16 (2 bytes a logit)
    dH GEMM    dH[n] += dz @ W_v        2NDV flops, cuBLAS, fp32 accumulation into the (N, D) fp32 gradient
    dW GEMM    dW_v += dz.T @ H_n       2NDV flops, cuBLAS, fp32 accumulation into the (v, D) chunk accumulator
    epilogue   the gradients' casts     dW chunks fp32 -> bf16, dH fp32 -> bf16: bytes only

Each step's time is max(flops / (efficiency x 790 TFLOP/s), bytes / (0.875 x 4.8 TB/s)): the stated peak rates
of an H200 (bf16 dense tensor cores, HBM3e), times what a kernel of that kind reaches. The efficiencies are
assumptions, not measurements: they are the numbers a GPU run checks first.

    cuBLAS GEMMs of thousands of rows a side        0.80  (published H100 / H200 bf16 GEMM rates: 600-750 TF/s)
    Triton wgmma kernels with an fp32 epilogue      0.60  (the forward and dz kernels; 0.52 with a soft-cap,
                                                           whose tanh costs MUFU time in the epilogue)
    HBM                                             0.875 (4.2 of 4.8 TB/s in streaming kernels)

HBM bytes, with the reuse each kernel's launch order is designed for (L2 50 MB):
- forward: H is read once (splits vary fastest, so the resident programs' H tiles fit L2); W once per wave of
  resident token tiles (SMs / splits tiles a wave, each W tile shared by them in L2).
- recompute: per tile, the H chunk once and the W chunk once per group of 8 token tiles (the kernel's grouped
  order) when it does not fit half the L2, else once; dz written once.
- GEMMs: dz read once each; the other operand once per tile; the fp32 accumulator read and written once per tile
  (written only, on its first tile).
``--measure`` on a GPU times the same steps (CUDA events around each step of the real loop, ``on_step``) and the
whole call, the cuBLAS bf16 matmul floor, the peers, the bitwise repeat, peak memory and the kernels' registers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

__all__ = ["Shape", "SHAPES", "RATES", "plan", "steps", "rows", "main"]

TFLOPS = 790e12  # H200 bf16 dense tensor-core peak
HBM = 4.8e12  # H200 HBM3e bytes/s
RATES = {"cublas": 0.80, "triton": 0.60, "triton_softcap": 0.52, "hbm": 0.875}
SMS = 132
L2 = 50 * 2**20
BF16 = 2


@dataclasses.dataclass(frozen=True)
class Shape:
    N: int
    D: int
    V: int
    softcap: float | None = None
    name: str = ""

    @property
    def key(self) -> str:
        return f"{self.N},{self.D},{self.V}"


SHAPES = [
    Shape(16384, 2048, 248320, None, "N16384 D2048 V248320"),
    Shape(8192, 2304, 256000, 30.0, "Gemma-2-2B (soft-cap 30)"),
    Shape(8192, 4096, 128256, None, "Llama-3-8B"),
]
# 60 % of 790 TFLOP/s on 8NDV flops: the target the model must meet
TARGET_FRACTION = 0.60


def _tiles():
    """The Triton tile maker as compiled for a GPU (under the interpreter the kernels use smaller blocks)."""
    from fastkto.kernels import fused_logprob as fl

    return dataclasses.replace(fl.TILES, align=fl.GPU_ALIGN), fl


def plan(shape: Shape, budget_mib: float) -> tuple[int, int, int]:
    """(token rows n, vocabulary rows v, workspace bytes) of fastkto's backward plan for this shape on a GPU."""
    import torch

    from fastkto.kernels import tiled

    tiles, _ = _tiles()
    call = tiled.CallShape(shape.N, shape.V, shape.D, torch.bfloat16, torch.bfloat16, "cuda", False, False, False,
                           shape.softcap is not None, True, False, True)
    n, v = tiled.plan_tiles(call, tiles, int(budget_mib * 2**20), False)
    return n, v, tiled.buffers_nbytes(tiled.workspace_buffers(n, v, call, tiles))


def _forward_splits(shape: Shape) -> int:
    """The forward's vocabulary splits on a 132-SM GPU, by the kernel's own rule."""
    _, fl = _tiles()
    cfg = fl._GPU_CONFIGS[("fwd", "16")]
    n_tiles = -(-shape.N // cfg.BLOCK_N)
    occupancy = -(-2 * SMS // n_tiles)
    l2 = -(-SMS * cfg.BLOCK_N * shape.D * BF16 // fl._L2_H_BYTES)
    return max(1, min(max(occupancy, l2), -(-shape.V // (4 * cfg.BLOCK_V))))


def steps(shape: Shape, budget_mib: float = 128) -> list[dict]:
    """The model's steps for one shape: dicts with step, flops, hbm_bytes, predicted_ms, rate (and notes)."""
    N, D, V = shape.N, shape.D, shape.V
    n, v, ws_bytes = plan(shape, budget_mib)
    tn, tv = -(-N // n), -(-V // v)  # token chunks, vocabulary chunks
    gemm = 2.0 * N * D * V
    tri = RATES["triton_softcap"] if shape.softcap else RATES["triton"]
    splits = _forward_splits(shape)
    resident_tiles = max(1, SMS // splits)
    fwd_waves = -(-(-(-N // 128)) // resident_tiles)
    w_chunk = v * D * BF16
    w_reads = 1 if w_chunk <= L2 // 2 else -(-n // (8 * 128))
    out = [
        dict(step="forward (Triton)", flops=gemm, rate=tri,
             hbm_bytes=N * D * BF16 + fwd_waves * V * D * BF16 + 12 * N * splits,
             note=f"{splits} vocabulary splits, {fwd_waves} wave(s) of resident token tiles"),
        dict(step="recompute dz (Triton)", flops=gemm, rate=tri,
             hbm_bytes=tv * N * D * BF16 + tn * w_reads * V * D * BF16 + N * V * BF16,
             note=f"{tn} x {tv} tiles of {n} x {v}; dz bf16"),
        dict(step="dH += dz @ W (cuBLAS)", flops=gemm, rate=RATES["cublas"],
             hbm_bytes=N * V * BF16 + tn * V * D * BF16 + (8 * tv - 4) * N * D,
             note="fp32 accumulator read + written once per vocabulary chunk"),
        dict(step="dW += dz.T @ H (cuBLAS)", flops=gemm, rate=RATES["cublas"],
             hbm_bytes=N * V * BF16 + tv * N * D * BF16 + (8 * tn - 4) * V * D,
             note="fp32 chunk accumulator read + written once per token chunk"),
        dict(step="epilogue (casts)", flops=0.0, rate=RATES["cublas"],
             hbm_bytes=(4 + 2) * V * D + (4 + 2) * N * D, note="dW chunks and dH to bf16"),
    ]
    for s in out:
        s["predicted_ms"] = 1e3 * max(s["flops"] / (s["rate"] * TFLOPS), s["hbm_bytes"] / (RATES["hbm"] * HBM))
        s["bound"] = "compute" if s["flops"] / (s["rate"] * TFLOPS) >= s["hbm_bytes"] / (RATES["hbm"] * HBM) \
            else "memory"
    total_ms = sum(s["predicted_ms"] for s in out)
    out.append(dict(step="total", flops=4 * gemm, hbm_bytes=sum(s["hbm_bytes"] for s in out), rate=None,
                    predicted_ms=total_ms, bound="",
                    note=f"{4 * gemm / (total_ms / 1e3) / TFLOPS:.0%} of 790 TFLOP/s on 8NDV; target <= "
                         f"{4 * gemm / (TARGET_FRACTION * TFLOPS) * 1e3:.0f} ms"))
    return out


def peak_bytes(shape: Shape, budget_mib: float = 128) -> dict:
    """Predicted memory beyond the inputs for forward + backward: the bf16 gradients, the fp32 hidden gradient and
    the workspace (the compact fp32 gradient and the bf16 one overlap only after the workspace is freed)."""
    n, v, ws = plan(shape, budget_mib)
    grads = BF16 * (shape.V * shape.D + shape.N * shape.D)
    dh32 = 4 * shape.N * shape.D
    return {"gradients": grads, "dh_fp32": dh32, "workspace": ws,
            "peak": grads + dh32 + max(ws, 0) + 16 * shape.N}


def rows(shapes: list[Shape], budget_mib: float) -> list[dict]:
    """The JSON rows: one per (shape, step), with keys shape, step, flops, hbm_bytes, predicted_ms."""
    out = []
    for shape in shapes:
        for s in steps(shape, budget_mib):
            out.append({"shape": shape.key, "step": s["step"], "flops": s["flops"], "hbm_bytes": s["hbm_bytes"],
                        "predicted_ms": s["predicted_ms"]})
    return out


def _print_model(shapes: list[Shape], budget_mib: float) -> None:
    print(f"H200 model: {TFLOPS / 1e12:.0f} TFLOP/s bf16, {HBM / 1e12:.1f} TB/s HBM; efficiencies {RATES}; "
          f"workspace {budget_mib:g} MiB")
    for shape in shapes:
        n, v, ws = plan(shape, budget_mib)
        print(f"\n{shape.name or shape.key}  (N={shape.N}, D={shape.D}, V={shape.V}"
              f"{f', soft-cap {shape.softcap:g}' if shape.softcap else ''}): tiles {n} x {v}, "
              f"workspace {ws / 2**20:.0f} MiB")
        print(f"  {'step':<26} {'GFLOP':>9} {'HBM GB':>8} {'ms':>8}  bound    note")
        for s in steps(shape, budget_mib):
            print(f"  {s['step']:<26} {s['flops'] / 1e9:>9.0f} {s['hbm_bytes'] / 1e9:>8.2f} "
                  f"{s['predicted_ms']:>8.2f}  {s['bound']:<8} {s['note']}")
        mem = peak_bytes(shape, budget_mib)
        print(f"  peak beyond the inputs: {mem['peak'] / 2**20:.0f} MiB = bf16 gradients "
              f"{mem['gradients'] / 2**20:.0f} + fp32 dH {mem['dh_fp32'] / 2**20:.0f} + workspace "
              f"{mem['workspace'] / 2**20:.0f} MiB")


# ---------------------------------------------------------------------------------------------------------------
# On a GPU


class _Clock:
    """Marks in a stream of work: CUDA events on a GPU (read after a synchronize), wall time elsewhere (the tests
    run the measurement on the CPU, the Triton kernels under the interpreter)."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self._torch = torch

    def mark(self):
        if self.cuda:
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        import time

        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return 1e3 * (b - a)

    def time_ms(self, fn, repeats=3, warmup=1) -> float:
        """Median of ``repeats`` timed calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = self.mark()
            fn()
            times.append(self.ms(start, self.mark()))
        return sorted(times)[len(times) // 2]


def _inputs(shape: Shape, device, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    hidden = (torch.randn(shape.N, shape.D, generator=g) * 2.0).to(device, dtype).requires_grad_()
    weight = (torch.randn(shape.V, shape.D, generator=g) * shape.D ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, shape.V, (shape.N,), generator=g).to(device)
    grad = torch.randn(shape.N, generator=g).to(device)
    return hidden, weight, labels, grad


def measure(shape: Shape, budget_mib: float, methods: list[str], device=None, dtype=None, repeats=3) -> dict:
    """Every measurement of one shape; a method that fails or cannot run is recorded, not raised.

    Default device CUDA, dtype bf16; the tests pass the CPU (Triton under its interpreter) and tiny shapes.
    """
    import torch

    import fastkto
    from fastkto.kernels import fused_logprob as fl
    from fastkto.memory import track_peak_memory

    from . import peers
    from .naive import naive_logprobs

    device = torch.device(device or "cuda")
    dtype = dtype or torch.bfloat16
    clock = _Clock(device)
    result = {"shape": shape.key, "name": shape.name, "steps": {}, "methods": {}, "errors": {}}
    hidden, weight, labels, grad = _inputs(shape, device, dtype)
    sc = shape.softcap
    budget = int(budget_mib * 2**20)

    # the floor: one (N x D) @ (D x V) product (cuBLAS on a GPU), and its rate
    a, b = hidden.detach(), weight.detach()
    ms = clock.time_ms(lambda: torch.mm(a, b.T), repeats)
    result["matmul_floor_ms"] = ms
    result["matmul_tflops"] = 2 * shape.N * shape.D * shape.V / (ms / 1e3) / 1e12

    # each step of the Triton path: the forward kernel alone, then the backward loop with marks at its steps
    fwd = fl.logprob_fwd(a, b, None, None, labels, softcap=sc, workspace_bytes=budget)
    lse = fwd[0] + fwd[1].log()
    result["steps"]["forward (Triton)"] = clock.time_ms(
        lambda: fl.logprob_fwd(a, b, None, None, labels, softcap=sc, workspace_bytes=budget), repeats)

    def backward_with_marks():
        marks = []
        fl.logprob_bwd(a, b, None, None, labels, lse, grad, softcap=sc, need_bias=False, workspace_bytes=budget,
                       on_step=lambda name: marks.append((name, clock.mark())))
        spent: dict[str, float] = {}
        for (name, t0), (_, t1) in zip(marks, marks[1:]):
            spent[name] = spent.get(name, 0.0) + clock.ms(t0, t1)
        return spent

    backward_with_marks()  # warm-up (compiles the dz kernel)
    spent = backward_with_marks()
    names = {"dz": "recompute dz (Triton)", "dH": "dH += dz @ W (cuBLAS)", "dW": "dW += dz.T @ H (cuBLAS)",
             "other": "epilogue (casts)"}
    for key, label in names.items():
        result["steps"][label] = spent.get(key, 0.0)
    result["backward_ms"] = clock.time_ms(lambda: fl.logprob_bwd(
        a, b, None, None, labels, lse, grad, softcap=sc, need_bias=False, workspace_bytes=budget), repeats)
    # the default budget's trade: smaller tiles save workspace; the model predicts no loss down to 32 MiB
    result["backward_ms_by_budget_mib"] = {
        mib: clock.time_ms(lambda mib=mib: fl.logprob_bwd(
            a, b, None, None, labels, lse, grad, softcap=sc, need_bias=False,
            workspace_bytes=int(mib * 2**20)), repeats)
        for mib in (budget_mib / 4, budget_mib / 2, budget_mib * 2)}

    # whole methods, forward + backward with a random upstream gradient: time and peak memory
    fns = {
        "fastkto-triton": lambda h, w: fastkto.fused_logprobs(h, w, labels, softcap=sc, backend="triton"),
        "fastkto-torch": lambda h, w: fastkto.fused_logprobs(h, w, labels, softcap=sc, backend="torch"),
        "naive": lambda h, w: naive_logprobs(h, w, labels, softcap=sc),
        "trl": lambda h, w: peers.trl_logprobs(h, w, labels, softcap=sc),
        "liger": lambda h, w: peers.liger_logprobs(h, w, labels, softcap=sc),
        "cce": lambda h, w: peers.cce_logprobs(h, w, labels, softcap=sc),
    }
    for method in methods:
        reason = None if (method == "fastkto-triton" and fl.INTERPRET) else peers.skip_reason(method, device)
        if reason:
            result["errors"][method] = f"skipped: {reason}"
            continue

        def run(fn=fns[method]):
            hidden.grad = weight.grad = None
            fn(hidden, weight).backward(grad)

        try:
            ms = clock.time_ms(run, repeats)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            hidden.grad = weight.grad = None
            with track_peak_memory(device) as mem:
                run()
            result["methods"][method] = {"ms": ms, "peak_mib": mem.peak / 2**20,
                                         "tflops_8ndv": 8 * shape.N * shape.D * shape.V / (ms / 1e3) / 1e12}
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory, a peer's missing feature: recorded
            result["errors"][method] = f"{type(exc).__name__}: {exc}"[:500]
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # bitwise repeat of the Triton path, forward and backward
    outs = []
    for _ in range(2):
        hidden.grad = weight.grad = None
        out = fastkto.fused_logprobs(hidden, weight, labels, softcap=sc, backend="triton")
        out.backward(grad)
        outs.append((out.detach().clone(), hidden.grad.clone(), weight.grad.clone()))
    result["bitwise_repeat"] = all(torch.equal(x, y) for x, y in zip(*outs))
    hidden.grad = weight.grad = None
    return result


def _kernel_registers() -> list[dict]:
    """n_regs / n_spills of every Triton kernel this process compiled (the driver's numbers)."""
    from fastkto.kernels import fused_logprob as fl

    out = []
    for name in ("_logprob_fwd_kernel", "_logprob_dz_kernel"):
        fn = getattr(fl, name)
        for cache in getattr(fn, "device_caches", {}).values():  # none under the interpreter
            for k in cache[0].values():
                getattr(k, "_init_handles", lambda: None)()
                out.append({"kernel": name, "n_regs": k.n_regs, "n_spills": k.n_spills,
                            "shared": k.metadata.shared})
    return out


def _print_measured(shapes: list[Shape], results: list[dict], budget_mib: float) -> None:
    for shape, r in zip(shapes, results):
        model = {s["step"]: s["predicted_ms"] for s in steps(shape, budget_mib)}
        print(f"\n{r['name'] or r['shape']}: cuBLAS bf16 matmul {r['matmul_floor_ms']:.2f} ms "
              f"({r['matmul_tflops']:.0f} TFLOP/s); bitwise repeat: {r['bitwise_repeat']}")
        print(f"  {'step':<26} {'predicted ms':>12} {'measured ms':>12}")
        for step, ms in r["steps"].items():
            print(f"  {step:<26} {model.get(step, float('nan')):>12.2f} {ms:>12.2f}")
        total = sum(r["steps"].values())
        print(f"  {'total':<26} {model['total']:>12.2f} {total:>12.2f}")
        print(f"  backward, whole: {r['backward_ms']:.2f} ms at {budget_mib:g} MiB; by budget: "
              + ", ".join(f"{mib:g} MiB {ms:.2f} ms" for mib, ms in r["backward_ms_by_budget_mib"].items()))
        floor = 4 * r["matmul_floor_ms"]
        for m, v in r["methods"].items():
            print(f"  {m:<16} {v['ms']:8.2f} ms  {v['tflops_8ndv']:6.0f} TFLOP/s on 8NDV  "
                  f"({floor / v['ms']:.0%} of 4 x the matmul floor)  peak {v['peak_mib']:.0f} MiB")
        for m, e in r["errors"].items():
            print(f"  {m}: {e}")


def _parse_shape(text: str) -> Shape:
    try:
        n, d, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape expects N,D,V (three integers), got {text!r}") from None
    if min(n, d, v) <= 0:
        raise argparse.ArgumentTypeError(f"--shape sizes must be positive, got {text!r}")
    return Shape(n, d, v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=_parse_shape, action="append", help="N,D,V (repeatable); default: the three "
                   "reference shapes")
    p.add_argument("--softcap", type=float, default=None, help="soft-cap for the --shape shapes")
    p.add_argument("--budget-mib", type=float, default=None, help="workspace budget (default: fastkto's CUDA "
                   "default)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--measure", action="store_true", help="on CUDA: time every step and the methods")
    p.add_argument("--methods", default="fastkto-triton,fastkto-torch,naive,trl,liger,cce")
    p.add_argument("--out", type=Path, default=None, help="--measure: write measured.json here")
    args = p.parse_args(argv)
    from fastkto.kernels import tiled

    budget = args.budget_mib or tiled.DEFAULT_WORKSPACE_MIB["cuda"]
    shapes = [dataclasses.replace(s, softcap=args.softcap) for s in args.shape] if args.shape else SHAPES
    if not args.measure:
        if args.json:
            print(json.dumps(rows(shapes, budget), indent=1))
        else:
            _print_model(shapes, budget)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("--measure needs a CUDA device", file=sys.stderr)
        return 2
    results = []
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "budget_mib": budget, "model": rows(shapes, budget),
              "measured": results, "kernels": []}
    for shape in shapes:  # written after each shape: a time limit still leaves what was measured
        results.append(measure(shape, budget, args.methods.split(",")))
        report["kernels"] = _kernel_registers()
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "measured.json").write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_measured(shapes[:len(results)], results, budget)
        for k in report["kernels"]:
            print(f"  {k['kernel']}: {k['n_regs']} registers, {k['n_spills']} spills, {k['shared']} B shared")
    return 0 if all(r["bitwise_repeat"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
