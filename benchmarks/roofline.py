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
import os
import sys
import time
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

    return dataclasses.replace(fl.TILE_MAKER, align=fl.GPU_ALIGN), fl


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
    return fl.vocab_splits(shape.V, cfg.BLOCK_V)  # V only: the same splits for any N and any GPU


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
             hbm_bytes=N * V * BF16 + tv * N * D * BF16 + ((8 * tn - 4) * V * D if tn > 1 else BF16 * V * D),
             note="fp32 chunk accumulator read + written once per token chunk" if tn > 1 else
                  "one token chunk: written straight into the bf16 weight gradient"),
        dict(step="epilogue (casts)", flops=0.0, rate=RATES["cublas"],
             hbm_bytes=((4 + 2) * V * D if tn > 1 else 0) + (4 + 2) * N * D,
             note="dW chunks and dH to bf16" if tn > 1 else "dH to bf16"),
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
    """Predicted memory beyond the inputs for forward + backward: the bf16 weight gradient and the fp32 hidden
    gradient, plus the larger of the workspace and the bf16 hidden gradient (the cast of the fp32 one, allocated
    after the loop frees the workspace: they never coexist)."""
    n, v, ws = plan(shape, budget_mib)
    grads = BF16 * (shape.V * shape.D + shape.N * shape.D)
    dh32 = 4 * shape.N * shape.D
    return {"gradients": grads, "dh_fp32": dh32, "workspace": ws,
            "peak": BF16 * shape.V * shape.D + dh32 + max(ws, BF16 * shape.N * shape.D) + 16 * shape.N}


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


FAULT_ENV = "FASTKTO_GPU_CHECK_FAULT"


def _fault(point: str) -> None:
    """Fault injection, so that the GPU check's failure handling is exercised on the CPU before the one GPU run.

    ``$FASTKTO_GPU_CHECK_FAULT``: comma-separated ``point[=kind]``; at a matching point ``raise`` (the default)
    raises RuntimeError, ``crash`` ends the process at once (exit 139, as a segfault or a sticky CUDA error that
    aborts), ``hang`` sleeps until a time limit ends the process. Points: ``shape:<N,D,V>``, the measurement
    steps (``plan``, ``matmul_floor``, ``forward``, ``backward_steps``, ``backward_whole``, ``budgets``,
    ``bitwise_repeat``, ``realistic``), ``method:<name>``, ``registers``."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, kind = item.partition("=")
        if name != point:
            continue
        if kind == "crash":
            sys.stdout.flush()
            os._exit(139)
        if kind == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected fault at {point}")


def _inputs(shape: Shape, device, dtype, seed=0):
    """Random inputs: hidden (N, D) ~ N(0, 4), weight rows ~ N(0, 1/D), uniform labels. The logits are N(0, 4)
    per entry: a near-uniform softmax (entropy about ln V - 2), unlike a trained model's."""
    import torch

    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    hidden = (torch.randn(shape.N, shape.D, generator=g) * 2.0).to(device, dtype).requires_grad_()
    weight = (torch.randn(shape.V, shape.D, generator=g) * shape.D ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, shape.V, (shape.N,), generator=g).to(device)
    grad = torch.randn(shape.N, generator=g).to(device)
    return hidden, weight, labels, grad


# A small trained LM's next-token distributions on text: SmolLM2-135M-Instruct on hh-rlhf (the first 40 pairs'
# prompt + chosen completion, 1024 positions, fp32: python -m benchmarks.realdata --softmax-stats) has a
# mean softmax entropy of 2.42 nats, a median of 84 tokens per position with p > 2^-12, and 4.9% of its 128 x 128
# probability blocks entirely below 2^-12 (what Cut Cross-Entropy's gradient filter skips). Logits
# s * (-log rank_j + REAL_SPREAD * e_rj), e_rj ~ N(0, 1) independent per position and token, match all three at
# V = 49152 (2.42 nats, 91 tokens, 4.8%); without the per-position term (the first H200 run's inputs) the same
# tokens are likely at every position and 88% of the blocks fall below, flattering the filter.
REAL_ENTROPY = 2.42
REAL_SPREAD = 1.1


def _entropy(hidden, weight, softcap, rows=256):
    """Mean softmax entropy (nats) over the first ``rows`` tokens, in fp32."""
    import torch

    with torch.no_grad():
        return _entropy_nograd(hidden, weight, softcap, rows)


def _entropy_nograd(hidden, weight, softcap, rows):
    import torch

    z = hidden[:rows].float() @ weight.float().T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def realistic_inputs(shape: Shape, device, dtype, seed=0, entropy=REAL_ENTROPY, spread=REAL_SPREAD):
    """Inputs whose softmax looks like a trained model's (see REAL_ENTROPY): Zipf-like token frequencies shared by
    every position (a "frequency" direction u in hidden space: weight row j gets -log(rank_j) along u, ranks a
    random permutation of the vocabulary) plus what the context adds, different at each position (weight rows g_j
    and hidden states n_r orthogonal to u with n_r . g_j ~ N(0, 1)); hidden state r is s * (u + spread * n_r), the
    scale s found by bisection so that the mean entropy is ``entropy`` nats; labels drawn from the model's own
    distribution (so the target logit is typical). Returns (hidden, weight, labels, grad, stats) with stats the
    achieved entropy and the share of 128 x 128 probability blocks whose largest entry is below 2^-12."""
    import torch

    from .realdata import blocks_below

    g = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(shape.D, generator=g)
    u /= u.norm()
    rank = torch.randperm(shape.V, generator=g).float() + 1

    def across_u(x):  # unit-variance dot products between rows of two such draws, nothing along u
        x = x * shape.D ** -0.25
        return x - torch.outer(x @ u, u)

    weight = across_u(torch.randn(shape.V, shape.D, generator=g)) + torch.outer(-torch.log(rank), u)
    base = (u + spread * across_u(torch.randn(shape.N, shape.D, generator=g))).to(device, torch.float32)
    w_dev = weight.to(device, dtype)
    del weight
    lo, hi = 0.0, 8.0
    for _ in range(20):  # entropy falls as the scale grows
        mid = (lo + hi) / 2
        if _entropy((base[:256] * mid).to(dtype), w_dev, shape.softcap) > entropy:
            lo = mid
        else:
            hi = mid
    hidden = (base * hi).to(dtype)
    labels = torch.empty(shape.N, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    below = None
    step = max(1, min(shape.N, (1 << 28) // max(shape.V, 1)))  # about 1 GiB of fp32 probabilities at a time
    for n0 in range(0, shape.N, step):
        z = hidden[n0:n0 + step].float() @ w_dev.float().T
        if shape.softcap:
            z = shape.softcap * torch.tanh(z / shape.softcap)
        p = torch.softmax(z, -1)
        labels[n0:n0 + step] = torch.multinomial(p, 1, generator=gen)[:, 0]
        if n0 == 0:  # CCE's filter criterion on the first chunk's full 128 x 128 blocks
            below = blocks_below(p)
        del z, p
    grad = torch.randn(shape.N, generator=torch.Generator().manual_seed(seed)).to(device)
    stats = {"entropy_nats": _entropy(hidden, w_dev, shape.softcap), "scale": hi,
             "blocks_below_2^-12": below}
    return hidden.requires_grad_(), w_dev.requires_grad_(), labels, grad, stats


def _method_fns(labels, sc):
    import fastkto

    from . import peers
    from .naive import naive_logprobs

    return {
        "fastkto-triton": lambda h, w: fastkto.fused_logprobs(h, w, labels, softcap=sc, backend="triton"),
        "fastkto-torch": lambda h, w: fastkto.fused_logprobs(h, w, labels, softcap=sc, backend="torch"),
        "naive": lambda h, w: naive_logprobs(h, w, labels, softcap=sc),
        "trl": lambda h, w: peers.trl_logprobs(h, w, labels, softcap=sc),
        "liger": lambda h, w: peers.liger_logprobs(h, w, labels, softcap=sc),
        "cce": lambda h, w: peers.cce_logprobs(h, w, labels, softcap=sc),
    }


PEERS = ("trl", "liger", "cce")


def _time_method(method, inputs, sc, clock, repeats, device) -> dict:
    """Forward + backward of one method with a random upstream gradient: time, peak memory and TFLOP/s."""
    import torch

    from fastkto.memory import track_peak_memory

    hidden, weight, labels, grad = inputs[:4]
    fn = _method_fns(labels, sc)[method]

    def run():
        hidden.grad = weight.grad = None
        fn(hidden, weight).backward(grad)

    try:
        ms = clock.time_ms(run, repeats)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        hidden.grad = weight.grad = None
        with track_peak_memory(device) as mem:
            run()
        N, D, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
        return {"ms": ms, "peak_mib": mem.peak / 2**20, "tflops_8ndv": 8 * N * D * V / (ms / 1e3) / 1e12}
    finally:
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _peer_in_process(shape, method, kinds, budget_mib, device, dtype, repeats, timeout) -> dict:
    """Run one peer in its own process (a crash or a sticky CUDA error there cannot reach this one): returns
    {input kind: measurement} or {"error": ...}; a time limit ends it."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [sys.executable, "-m", "benchmarks.roofline", "--peer-worker", method, "--shape", shape.key,
               "--peer-kinds", ",".join(kinds), "--repeats", str(repeats), "--device", str(device),
               "--dtype", str(dtype).replace("torch.", ""), "--out", str(out)]
        if shape.softcap:
            cmd += ["--softcap", str(shape.softcap)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout: the peer's process ran past {timeout:g} s"}
        if out.exists():
            return json.loads(out.read_text())
        return {"error": f"the peer's process ended with {proc.returncode}: {(proc.stderr or '')[-400:]}"}


def _peer_worker(args) -> int:
    """--peer-worker METHOD: time one peer on both kinds of inputs, write {kind: result or error} to --out."""
    import torch

    _fault(f"method:{args.peer_worker}")
    shape = dataclasses.replace(args.shape[0], softcap=args.softcap)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    clock = _Clock(device)
    out = {}
    for kind in args.peer_kinds.split(","):
        try:
            inputs = _inputs(shape, device, dtype) if kind == "random" else realistic_inputs(shape, device, dtype)
            out[kind] = _time_method(args.peer_worker, inputs, shape.softcap, clock, args.repeats, device)
        except Exception as exc:  # noqa: BLE001 - recorded for the parent
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        args.out.write_text(json.dumps(out))
    return 0


def measure(shape: Shape, budget_mib: float, methods: list[str], device=None, dtype=None, repeats=3,  # noqa: C901
            sink=None, isolate_peers: bool = False, peer_timeout: float = 150,
            input_kinds=("random", "realistic"), cost_model: bool = True) -> dict:
    """Every measurement of one shape; a step or method that fails or cannot run is recorded, not raised.

    Each step is guarded (its exception goes to ``result["errors"][step]``, the next step runs) and ``sink(result)``
    is called after each, so a caller that writes it loses nothing to a later failure or time limit. The bitwise
    repeat runs before any peer; with ``isolate_peers`` each peer runs in its own process (``peer_timeout``
    seconds), so a peer's crash or sticky CUDA error cannot end this one. Methods are timed on each of
    ``input_kinds``: "random" (near-uniform softmax) and "realistic" (a trained model's entropy, see
    ``realistic_inputs``). Default device CUDA, dtype bf16; the tests pass the CPU (Triton under its interpreter)
    and tiny shapes. ``cost_model=False`` (with isolated peers only): no inputs here and none of the cost model's
    steps, only the peers' processes (the GPU check measures the model first, then the peers as time allows).
    """
    import torch

    import fastkto
    from fastkto.kernels import fused_logprob as fl
    from fastkto.kernels import tiled


    device = torch.device(device or "cuda")
    dtype = dtype or torch.bfloat16
    clock = _Clock(device)
    result = {"shape": shape.key, "name": shape.name, "steps": {}, "methods": {}, "errors": {}, "done": []}
    sink = sink or (lambda r: None)
    sc = shape.softcap
    budget = int(budget_mib * 2**20)

    def guarded(step, fn):
        t0 = time.perf_counter()
        try:
            _fault(step)
            value = fn()
            result["done"].append(step)
            return value
        except Exception as exc:  # noqa: BLE001 - recorded; the next step runs
            result["errors"][step] = f"{type(exc).__name__}: {exc}"[:500]
            return None
        finally:
            result.setdefault("step_seconds", {})[step] = time.perf_counter() - t0
            sink(result)

    if not cost_model:
        if not isolate_peers or any(m not in PEERS for m in methods):
            raise ValueError("cost_model=False measures only peers, each in its own process (isolate_peers=True)")
        _measure_methods(shape, methods, dict.fromkeys(input_kinds), result, sink, None, budget_mib, device, dtype,
                         repeats, True, peer_timeout)
        return result
    inputs = guarded("inputs", lambda: _inputs(shape, device, dtype))
    if inputs is None:
        return result
    hidden, weight, labels, grad = inputs
    a, b = hidden.detach(), weight.detach()

    def plan():
        call = tiled.call_shape(a, b, None, None, labels, sc, True, False)
        n, v = tiled.plan_tiles(call, fl.TILE_MAKER, budget, False)
        ws = tiled.buffers_nbytes(tiled.workspace_buffers(n, v, call, fl.TILE_MAKER))
        mm, addmm = tiled.fp32_gemm_support(device.type)
        cfg = fl.select_config("fwd", dtype)
        n_tiles = -(-shape.N // cfg.BLOCK_N)
        splits = fl.vocab_splits(shape.V, cfg.BLOCK_V)
        result["plan"] = {
            "tile": [n, v], "token_chunks": -(-shape.N // n), "vocab_chunks": -(-shape.V // v),
            "workspace_mib": ws / 2**20, "buffers": sorted(tiled.workspace_buffers(n, v, call, fl.TILE_MAKER)),
            "fp32_gemm_support": {"mm_out_dtype": mm, "addmm_fp32_accumulate": addmm},
            "gemm_path": "addmm(fp32 acc, 16-bit, 16-bit, out_dtype=fp32)" if addmm else
                         "fallback: mm(out_dtype=fp32) into a prod buffer, then add_",
            "forward_splits": splits, "forward_programs": n_tiles * splits, "sms": fl._num_sms(device),
            "configs": {f"{k[0]}/{k[1]}": dataclasses.asdict(c) for k, c in fl.gpu_configs().items()},
        }

    guarded("plan", plan)

    def floor():  # one (N x D) @ (D x V) product (cuBLAS on a GPU), and its rate
        ms = clock.time_ms(lambda: torch.mm(a, b.T), repeats)
        result["matmul_floor_ms"] = ms
        result["matmul_tflops"] = 2 * shape.N * shape.D * shape.V / (ms / 1e3) / 1e12

    guarded("matmul_floor", floor)
    lse = guarded("forward", lambda: _forward(a, b, labels, sc, budget, clock, repeats, result))

    def backward_with_marks():
        marks = []
        fl.logprob_bwd(a, b, None, None, labels, lse, grad, softcap=sc, need_bias=False, workspace_bytes=budget,
                       on_step=lambda name: marks.append((name, clock.mark())))
        spent: dict[str, float] = {}
        for (name, t0), (_, t1) in zip(marks, marks[1:]):
            spent[name] = spent.get(name, 0.0) + clock.ms(t0, t1)
        return spent

    def backward_steps():
        backward_with_marks()  # warm-up (compiles the dz kernel)
        spent = backward_with_marks()
        names = {"dz": "recompute dz (Triton)", "dH": "dH += dz @ W (cuBLAS)", "dW": "dW += dz.T @ H (cuBLAS)",
                 "other": "epilogue (casts)"}
        for key, label in names.items():
            result["steps"][label] = spent.get(key, 0.0)

    if lse is not None:
        guarded("backward_steps", backward_steps)
        guarded("backward_whole", lambda: result.__setitem__("backward_ms", clock.time_ms(lambda: fl.logprob_bwd(
            a, b, None, None, labels, lse, grad, softcap=sc, need_bias=False, workspace_bytes=budget), repeats)))

        def budgets():  # smaller tiles save workspace; the model predicts no loss down to 32 MiB
            result["backward_ms_by_budget_mib"] = {}
            for mib in (budget_mib / 4, budget_mib / 2, budget_mib * 2):
                result["backward_ms_by_budget_mib"][mib] = clock.time_ms(lambda mib=mib: fl.logprob_bwd(
                    a, b, None, None, labels, lse, grad, softcap=sc, need_bias=False,
                    workspace_bytes=int(mib * 2**20)), repeats)
                sink(result)

        guarded("budgets", budgets)

    def bitwise():  # the Triton path twice, forward and backward, before any peer has touched the device
        outs = []
        for _ in range(2):
            hidden.grad = weight.grad = None
            out = fastkto.fused_logprobs(hidden, weight, labels, softcap=sc, backend="triton")
            out.backward(grad)
            outs.append((out.detach().clone(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
        result["bitwise_repeat"] = all(torch.equal(x, y) for x, y in zip(*outs))

    guarded("bitwise_repeat", bitwise)

    kinds = {"random": inputs}
    if "realistic" in input_kinds:
        real = guarded("realistic", lambda: realistic_inputs(shape, device, dtype))
        if real is not None:
            kinds["realistic"] = real[:4]
            result["realistic_inputs"] = real[4]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    kinds = {k: v for k, v in kinds.items() if k in input_kinds}
    _measure_methods(shape, methods, kinds, result, sink, guarded, budget_mib, device, dtype, repeats,
                     isolate_peers, peer_timeout, sc, clock)
    return result


def _measure_methods(shape, methods, kinds, result, sink, guarded, budget_mib, device, dtype, repeats,
                     isolate_peers, peer_timeout, sc=None, clock=None) -> None:
    """``measure``'s methods on each kind of inputs: fastkto's and the naive head in this process, then the peers
    (each in its own process with ``isolate_peers``)."""
    from fastkto.kernels import fused_logprob as fl

    from . import peers

    for method in [m for m in methods if m not in PEERS] + [m for m in methods if m in PEERS]:
        reason = None if (method == "fastkto-triton" and fl.INTERPRET) else peers.skip_reason(method, device)
        if reason:
            result["errors"][method] = f"skipped: {reason}"
            sink(result)
            continue
        if isolate_peers and method in PEERS:
            t0 = time.perf_counter()
            got = _peer_in_process(shape, method, list(kinds), budget_mib, device, dtype, repeats, peer_timeout)
            # its process's whole life (start, inputs, compilations, timing): what sizes the GPU check's budget
            result.setdefault("step_seconds", {})[f"peer:{method}"] = time.perf_counter() - t0
            if "error" in got:
                result["errors"][method] = got["error"]
            for kind, r in got.items():
                if kind == "error":
                    continue
                if "error" in r:
                    result["errors"][f"{method}/{kind}"] = r["error"]
                else:
                    result["methods"].setdefault(method, {})[kind] = r
            sink(result)
            continue
        for kind, inp in kinds.items():
            r = guarded(f"method:{method}" if kind == "random" else f"method:{method}/{kind}",
                        lambda inp=inp: _time_method(method, inp, sc, clock, repeats, device))
            if r is not None:
                result["methods"].setdefault(method, {})[kind] = r
                sink(result)


def _forward(a, b, labels, sc, budget, clock, repeats, result):
    from fastkto.kernels import fused_logprob as fl

    fwd = fl.logprob_fwd(a, b, None, None, labels, softcap=sc, workspace_bytes=budget)
    lse = fwd[0] + fwd[1].log()
    result["steps"]["forward (Triton)"] = clock.time_ms(
        lambda: fl.logprob_fwd(a, b, None, None, labels, softcap=sc, workspace_bytes=budget), repeats)
    return lse


def _kernel_registers() -> list[dict]:
    """n_regs / n_spills of every Triton kernel this process compiled (the driver's numbers); a kernel whose
    numbers cannot be read is listed with the reason."""
    from fastkto.kernels import fused_logprob as fl

    _fault("registers")
    out = []
    for name in ("_logprob_fwd_kernel", "_logprob_dz_kernel"):
        fn = getattr(fl, name)
        for cache in getattr(fn, "device_caches", {}).values():  # none under the interpreter
            try:
                kernels = list(cache[0].values())
            except Exception as exc:  # noqa: BLE001 - another Triton's cache layout
                out.append({"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            for k in kernels:
                try:
                    getattr(k, "_init_handles", lambda: None)()
                    out.append({"kernel": name, "n_regs": k.n_regs, "n_spills": k.n_spills,
                                "shared": k.metadata.shared,
                                "constants": {str(c): str(v) for c, v in
                                              getattr(k, "constants", {}).items()} if hasattr(k, "constants")
                                else None})
                except Exception as exc:  # noqa: BLE001
                    out.append({"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return out


# The tile configurations the GPU check times (16-bit inputs; BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages).
# The first of each is the default. The default stays fixed (no autotuning at run time: plans and bits must not
# depend on a search); the sweep tells one GPU run which to make the default. tests/test_compile.py checks that
# each compiles for sm_90 without spills, so the run spends no time on one that cannot.
SWEEP_CONFIGS = {
    "fwd": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
            (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    "dz": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
           (128, 64, 64, 4, 4)],
}


def sweep(shapes: list[Shape], device, dtype, repeats=3, sink=None, configs=None) -> list[dict]:
    """Time the forward kernel and the whole backward (whose dz kernel is the part that changes) under each tile
    configuration of ``configs`` (default ``SWEEP_CONFIGS``), per shape; a configuration that fails is recorded.
    ``sink(rows)`` after each configuration."""
    import torch

    from fastkto.kernels import fused_logprob as fl

    configs = configs or SWEEP_CONFIGS
    clock = _Clock(torch.device(device))
    width = "32" if dtype == torch.float32 else "16"
    out: list[dict] = []
    saved = dict(fl._GPU_CONFIGS)
    for shape in shapes:
        hidden, weight, labels, grad = _inputs(shape, device, dtype)
        a, b = hidden.detach(), weight.detach()
        del hidden, weight
        lse = None
        for kernel, cfgs in configs.items():
            for cfg in cfgs:
                row = {"shape": shape.key, "kernel": kernel, "config": list(cfg), "default": cfg == cfgs[0]}
                t0 = time.perf_counter()
                try:
                    _fault(f"sweep:{kernel}:{','.join(map(str, cfg))}")
                    fl._GPU_CONFIGS[(kernel, width)] = fl.KernelConfig(*cfg)
                    if kernel == "fwd":
                        fwd = fl.logprob_fwd(a, b, None, None, labels, softcap=shape.softcap)
                        row["ms"] = clock.time_ms(lambda: fl.logprob_fwd(
                            a, b, None, None, labels, softcap=shape.softcap), repeats)  # noqa: F821 (del a, b below)
                        if cfg == cfgs[0]:
                            lse = fwd[0] + fwd[1].log()
                    else:
                        if lse is None:
                            fl._GPU_CONFIGS.update(saved)
                            fwd = fl.logprob_fwd(a, b, None, None, labels, softcap=shape.softcap)
                            lse = fwd[0] + fwd[1].log()
                            fl._GPU_CONFIGS[(kernel, width)] = fl.KernelConfig(*cfg)
                        row["backward_ms"] = clock.time_ms(lambda: fl.logprob_bwd(
                            a, b, None, None, labels, lse, grad, softcap=shape.softcap, need_bias=False),  # noqa: F821
                            repeats)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: recorded
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    fl._GPU_CONFIGS.clear()
                    fl._GPU_CONFIGS.update(saved)
                row["seconds"] = time.perf_counter() - t0
                out.append(row)
                if sink:
                    sink(out)
        del a, b
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return out


def _print_measured(shapes: list[Shape], results: list[dict], budget_mib: float) -> None:
    """The measured steps next to the model, the methods on each kind of inputs, and every error (whatever part of
    a result is there: a partial result prints what it has)."""
    nan = float("nan")
    for shape, r in zip(shapes, results):
        model = {s["step"]: s["predicted_ms"] for s in steps(shape, budget_mib)}
        print(f"\n{r.get('name') or r['shape']}: cuBLAS bf16 matmul {r.get('matmul_floor_ms', nan):.2f} ms "
              f"({r.get('matmul_tflops', nan):.0f} TFLOP/s); bitwise repeat: {r.get('bitwise_repeat')}")
        if "plan" in r:
            p = r["plan"]
            print(f"  plan: tiles {p['tile'][0]} x {p['tile'][1]} ({p['token_chunks']} x {p['vocab_chunks']}), "
                  f"workspace {p['workspace_mib']:.0f} MiB, forward {p['forward_splits']} splits "
                  f"({p['forward_programs']} programs on {p['sms']} SMs); GEMM path: {p['gemm_path']}")
        print(f"  {'step':<26} {'predicted ms':>12} {'measured ms':>12}")
        for step, ms in r["steps"].items():
            print(f"  {step:<26} {model.get(step, nan):>12.2f} {ms:>12.2f}")
        if r["steps"]:
            print(f"  {'total':<26} {model['total']:>12.2f} {sum(r['steps'].values()):>12.2f}")
        if "backward_ms" in r:
            print(f"  backward, whole: {r['backward_ms']:.2f} ms at {budget_mib:g} MiB; by budget: "
                  + ", ".join(f"{mib:g} MiB {ms:.2f} ms"
                              for mib, ms in r.get("backward_ms_by_budget_mib", {}).items()))
        if "realistic_inputs" in r:
            st = r["realistic_inputs"]
            print(f"  realistic inputs: entropy {st['entropy_nats']:.2f} nats, "
                  f"{st['blocks_below_2^-12']} of 128 x 128 blocks below 2^-12")
        floor = 4 * r.get("matmul_floor_ms", nan)
        for m, by_kind in r["methods"].items():
            for kind, v in by_kind.items():
                print(f"  {m:<16} {kind:<9} {v['ms']:8.2f} ms  {v['tflops_8ndv']:6.0f} TFLOP/s on 8NDV  "
                      f"({floor / v['ms']:.0%} of 4 x the matmul floor)  peak {v['peak_mib']:.0f} MiB")
        for m, e in r["errors"].items():
            print(f"  {m}: {e}")


def environment() -> dict:
    """What the run ran on: versions, device, fp32 GEMM support (which GEMM path the backward takes)."""
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "transformers", "trl", "liger_kernel", "cut_cross_entropy"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - recorded as missing
            env[mod] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   sms=prop.multi_processor_count, memory_gib=prop.total_memory / 2**30)
    try:
        from fastkto.kernels import tiled

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        mm, addmm = tiled.fp32_gemm_support(dev)
        env["fp32_gemm_support"] = {"device": dev, "mm_out_dtype": mm, "addmm_fp32_accumulate": addmm}
    except Exception as exc:  # noqa: BLE001
        env["fp32_gemm_support"] = f"probe failed: {type(exc).__name__}: {exc}"[:300]
    return env


def _measure_all(args, shapes, budget) -> int:
    """--measure: every shape guarded, the report written after every step; exit 0 when everything was measured
    and repeats bitwise, 1 when a repeat differs, 3 when something is missing (see report["status"])."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else
                                                         torch.float32)
    results: list[dict] = []
    report = {"status": "running", "device_arg": str(device), "dtype": str(dtype), "budget_mib": budget,
              "environment": None, "model": None, "measured": results, "kernels": [], "errors": {}}

    def write():
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            tmp = args.out / "measured.json.tmp"
            tmp.write_text(json.dumps(report, indent=1, default=str))
            tmp.replace(args.out / "measured.json")  # never a half-written file

    for key, fn in (("environment", environment), ("model", lambda: rows(shapes, budget))):
        try:
            report[key] = fn()
        except Exception as exc:  # noqa: BLE001
            report["errors"][key] = f"{type(exc).__name__}: {exc}"[:500]
    write()
    methods = args.methods.split(",")
    for shape in ([] if args.sweep_only else shapes):
        try:
            _fault(f"shape:{shape.key}")
            results.append(measure(shape, budget, methods, device=device, dtype=dtype, repeats=args.repeats,
                                   sink=lambda r: write(), isolate_peers=not args.no_isolate,
                                   peer_timeout=args.peer_timeout, cost_model=not args.peers_only))
            results[-1] = results[-1]  # (the sink already wrote it)
        except Exception as exc:  # noqa: BLE001 - that shape's error; the next shape runs
            report["errors"][f"shape:{shape.key}"] = f"{type(exc).__name__}: {exc}"[:500]
        try:
            report["kernels"] = _kernel_registers()
        except Exception as exc:  # noqa: BLE001
            report["errors"]["registers"] = f"{type(exc).__name__}: {exc}"[:500]
        write()
    if args.sweep or args.sweep_only:
        configs = {k: v[:args.sweep_max] for k, v in SWEEP_CONFIGS.items()} if args.sweep_max else None
        try:
            report["sweep"] = sweep(shapes, device, dtype, args.repeats, sink=lambda rows: (
                report.__setitem__("sweep", rows), write()), configs=configs)
        except Exception as exc:  # noqa: BLE001
            report["errors"]["sweep"] = f"{type(exc).__name__}: {exc}"[:500]
    missing = dict(report["errors"])
    for r in results:
        missing.update({f"{r['shape']}/{k}": v for k, v in r["errors"].items() if not v.startswith("skipped")})
    missing.update({f"sweep/{r['kernel']}/{r['config']}": r["error"] for r in report.get("sweep", [])
                    if "error" in r})
    complete = (args.sweep_only or len(results) == len(shapes)) and not missing
    repeats_ok = all(r.get("bitwise_repeat") is not False for r in results)
    report["status"] = ("complete" if complete else "partial") + ("" if repeats_ok else ", bitwise repeat differs")
    report["missing"] = missing
    write()
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        _print_measured(shapes[:len(results)], results, budget)
        for k in report["kernels"]:
            print(f"  {k}")
        for k, e in report["errors"].items():
            print(f"  {k}: {e}")
        print(f"status: {report['status']}")
    return 1 if not repeats_ok else (0 if complete else 3)


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
    p.add_argument("--measure", action="store_true", help="time every step and the methods (CUDA; --device cpu "
                   "under TRITON_INTERPRET=1 for tests of the measurement itself)")
    p.add_argument("--methods", default="fastkto-triton,fastkto-torch,naive,trl,liger,cce")
    p.add_argument("--out", type=Path, default=None, help="--measure: write measured.json here (after every step)")
    p.add_argument("--device", default=None, help="--measure: cuda (default) or cpu")
    p.add_argument("--dtype", default=None, help="--measure: bfloat16 (default on CUDA) or float32")
    p.add_argument("--repeats", type=int, default=3, help="--measure: timed calls per point (median)")
    p.add_argument("--no-isolate", action="store_true", help="--measure: run the peers in this process")
    p.add_argument("--peer-timeout", type=float, default=150, help="--measure: seconds per peer process")
    p.add_argument("--sweep", action="store_true", help="--measure: also time the kernels' tile configurations")
    p.add_argument("--sweep-only", action="store_true", help="--measure: only the tile sweep")
    p.add_argument("--peers-only", action="store_true",
                   help="--measure: only the peers of --methods, each in its own process (no cost-model steps)")
    p.add_argument("--sweep-max", type=int, default=None, help="--sweep: the first K configurations per kernel")
    p.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-kinds", default="random,realistic", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from fastkto.kernels import tiled

    budget = args.budget_mib or tiled.DEFAULT_WORKSPACE_MIB["cuda"]
    shapes = [dataclasses.replace(s, softcap=args.softcap) for s in args.shape] if args.shape else SHAPES
    if args.peer_worker:
        return _peer_worker(args)
    if not args.measure:
        if args.json:
            print(json.dumps(rows(shapes, budget), indent=1))
        else:
            _print_model(shapes, budget)
        return 0
    import torch

    if args.device in (None, "cuda") and not torch.cuda.is_available():
        print("--measure needs a CUDA device (or --device cpu under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    return _measure_all(args, shapes, budget)


if __name__ == "__main__":
    raise SystemExit(main())
