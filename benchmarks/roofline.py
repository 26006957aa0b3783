"""A cost model of fastkto's GPU path (Triton backend, H200), step by step, in three scenarios (optimistic,
central, pessimistic), to hold against a GPU run.

    python -m benchmarks.roofline                                  # the three reference shapes, every scenario
    python -m benchmarks.roofline --scenario central --shape 8192,4096,128256 --softcap 30 --budget-mib 128
    python -m benchmarks.roofline --scored 2048 --shape 8192,2304,256000 --softcap 30   # a masked call
    python -m benchmarks.roofline --gemm-path fallback             # torch without the fp32-accumulating addmm
    python -m benchmarks.roofline --rates                          # the rate table: each rate and its source
    python -m benchmarks.roofline --compare benchmarks/results/h200/run2/roofline_measured.json
    python -m benchmarks.roofline --json                           # the same as JSON rows, each with its scenario
    python -m benchmarks.roofline --measure --out DIR              # on CUDA: every step timed next to its prediction

The plan is fastkto's own: the tile shape comes from ``fastkto.kernels.tiled.plan_tiles`` with the GPU kernel's
block alignment, so the model follows the code. A call of N hidden rows, M of them scored (M = N unless
``--scored``), hidden size D, vocabulary V, bf16 inputs, a trainable head (dH and dW), runs these steps:

    forward    _logprob_fwd_kernel      2MDV flops: logits tiles on chip, online log-sum-exp; the splits' merge
    recompute  _logprob_dz_kernel       2MDV flops, once per (n x v) tile: dz written in bf16 (2 bytes a logit)
    dH GEMM    dH[n] += dz @ W_v        2MDV flops, cuBLAS, fp32 accumulation into the (M, D) fp32 gradient
    dW GEMM    dW_v += dz.T @ H_n       2MDV flops, cuBLAS, fp32 accumulation into the (v, D) chunk accumulator
                                        (one token chunk: written straight into the bf16 weight gradient)
    epilogue   casts and gathers        dW chunks fp32 -> bf16, dH fp32 -> bf16 (scattered when masked), the
                                        scored rows of H gathered (masked calls): bytes only
    sustained  the whole call           what back-to-back calls cost beyond their steps timed one at a time

The three scenarios differ only in their rates (``RATE_TABLE``: one row per rate, its optimistic, central and
pessimistic value and where it comes from, measured or assumed; the next GPU run replaces assumptions there):

- optimistic: the model as written before any GPU ran it. Each step max(flops / rate, bytes / bandwidth): cuBLAS
  at 0.80 and the Triton kernels at 0.60 (0.52 with a soft-cap) of 790 TFLOP/s, every byte hidden under the
  products, every wave full.
- central: the rates that explain the H200's run 2. A Triton launch: its programs' main loops (capped by the L2
  roof of the 128 x 128 x 64 tile: 64 FLOP per byte streamed from L2) plus an epilogue per 128 x 128 tile that
  nothing overlaps, in waves of SMs x CTAs-per-SM programs (the last wave's fill counts). A cuBLAS GEMM: 790
  TFLOP/s in waves of output tiles (the best fill of three tile shapes, as cuBLAS picks its kernel), plus its fp32
  accumulator's read-modify-write (or the first tile's write) at HBM speed, not hidden. A gap per kernel
  boundary; the whole call a few percent above its steps timed one at a time.
- pessimistic: a bound on the same structure: slower main loops and epilogues, the L2 at the lowest bandwidth a
  measurement allows, the worst fill of the three cuBLAS tile shapes, slower HBM, longer gaps.

HBM bytes, with the reuse each kernel's launch order is designed for (L2 50 MB):
- forward: H is read once (splits vary fastest, so the resident programs' H tiles fit L2); W once per wave of
  resident token tiles (SMs / splits tiles a wave, each W tile shared by them in L2).
- recompute: per tile, the H chunk once and the W chunk once per group of 8 token tiles (the kernel's grouped
  order) when it does not fit half the L2, else once; dz written once.
- GEMMs: dz read once each; the other operand once per tile; the fp32 accumulator read and written once per tile
  (written only, on its first tile). Without ``addmm(..., out_dtype=fp32)`` (``--gemm-path fallback``) each
  accumulating GEMM writes its product to an fp32 ``prod`` buffer of the workspace and a separate ``add_`` reads
  it and the accumulator and writes the sum: 16 bytes an element instead of 8, one more kernel, and the plan's
  tiles shrink to make room for ``prod``.
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

__all__ = ["Shape", "SHAPES", "RATES", "RATE_TABLE", "SCENARIOS", "Rates", "scenario_rates", "plan", "steps",
           "peak_bytes", "rows", "measured_steps", "main"]

TFLOPS = 790e12  # measured: cuBLAS bf16 8192^3 on the H200 (the datasheet says 989 dense); the unit of every rate
HBM = 4.8e12  # H200 HBM3e bytes/s (datasheet)
# the optimistic scenario's efficiencies, as first written (fractions of TFLOPS and HBM)
RATES = {"cublas": 0.80, "triton": 0.60, "triton_softcap": 0.52, "hbm": 0.875}
SMS = 132
L2 = 50 * 2**20
BF16 = 2
SCENARIOS = ("optimistic", "central", "pessimistic")
# cuBLAS output tile shapes whose wave fill the central (best of them) and pessimistic (worst) scenarios take
CUBLAS_TILES = ((128, 128), (128, 256), (256, 128))

# name: (optimistic, central, pessimistic, unit, source). "run 2": benchmarks/results/h200/run2 (fastkto at 8ab057c,
# whose kernels and plan are today's), N x D x V = 16384 x 2048 x 248320, Gemma-2-2B's 8192 x 2304 x 256000 with a
# soft-cap of 30, Llama-3-8B's 8192 x 4096 x 128256.
RATE_TABLE = {
    "hbm_tbs": (4.2, 4.2, 3.9, "TB/s",
                "assumed 0.875 x the 4.8 TB/s datasheet; measured on the H200: 4.3 TB/s device-to-device copy"),
    "l2_tbs": (0.0, 10.0, 7.6, "TB/s",
               "L2 -> SM bandwidth (0: no L2 roof); a Triton kernel's main loop is capped at 64 FLOP/B (its "
               "128 x 128 x 64 tile) x this. Measured lower bound 7.6: run 2's dz kernel at Llama-3-8B ran at "
               "486 TFLOP/s, every operand byte from L2. Central 10 assumed (the fitted dz loop below needs 9.0)"),
    "fwd_main": (0.60, 0.58, 0.54, "x 790",
                 "forward kernel's main loop at 1 CTA per SM (latency-bound: 3 stages, no second CTA). Central: "
                 "fitted to run 2's forward at 16384 x 2048 and Llama-3-8B, with the epilogue below"),
    "fwd_main_softcap": (0.52, 0.58, 0.54, "x 790", "the same loop (the soft-cap costs in the epilogue)"),
    "fwd_epilogue_us": (0.0, 1.5, 1.8, "us / tile",
                        "exposed epilogue per 128 x 128 tile (online max, exp, sums), SM time. Central: fitted "
                        "with fwd_main (1.49)"),
    "fwd_epilogue_softcap_us": (0.0, 2.5, 2.9, "us / tile",
                                "the same with tanh. Central: fitted to run 2's Gemma-2 forward (2.47)"),
    "fwd_ctas_per_sm": (1, 1, 1, "CTAs", "measured: 224-232 registers x 256 threads, 96 KiB shared (runs 1, 2)"),
    "dz_main": (0.60, 0.73, 0.62, "x 790",
                "dz kernel's main loop at 2 CTAs per SM (one CTA's loads hide the other's latency). Central: "
                "fitted to run 2's dz at 16384 x 2048 and Llama-3-8B, with the epilogue below (0.727)"),
    "dz_main_softcap": (0.52, 0.73, 0.62, "x 790", "the same loop"),
    "dz_epilogue_us": (0.0, 3.1, 3.5, "us / tile",
                       "exposed cost per program (pipeline fill, dz formula, the 32 KiB store), SM time. Central: "
                       "fitted with dz_main (3.13)"),
    "dz_epilogue_softcap_us": (0.0, 3.9, 4.4, "us / tile", "with tanh. Central: fitted to run 2's Gemma-2 dz (3.90)"),
    "dz_ctas_per_sm": (2, 2, 2, "CTAs", "measured: 128 registers x 256 threads, 96 KiB shared (runs 1, 2)"),
    "cublas": (0.80, 1.00, 0.95, "x 790",
               "GEMM main loop. Central: 790 TFLOP/s, the measured 8192^3 rate (not fitted: with the fill and "
               "the exposed accumulator below it gives run 2's six gradient GEMMs within 4 %); pessimistic: 0.95 "
               "(the lowest square-matmul rate measured, 769 on random data, rounded down)"),
    "cublas_fill": ("none", "best", "worst", "",
                    "wave fill of the GEMMs' output tiles on 132 SMs, best or worst of 128x128, 128x256, 256x128: "
                    "cuBLAS picks its kernel, so it is not known (run 2 fits the best)"),
    "rmw_exposed": (0.0, 1.0, 1.0, "share",
                    "the GEMMs' C traffic (fp32 accumulator read + write, or the first tile's write) added to "
                    "their time, at hbm_tbs. Central: inferred from run 2, whose dH GEMMs took 790 TFLOP/s plus all of "
                    "it (within 4 %); max(compute, bytes) would make them 9-15 % faster than measured"),
    "triton_waves": (0, 1, 2, "",
                     "wave quantization of every Triton launch, the last wave's fill counting: 1 in waves of one "
                     "program per SM (programs / SMs: a program alone on an SM runs at the SM's rate), 2 of one "
                     "per CTA slot (programs / (SMs x CTAs per SM)), 0 none. Assumed (run 2 cannot tell them apart "
                     "for the forward, at 1 CTA per SM; for dz, 1 fits)"),
    "launch_us": (0.0, 3.0, 5.0, "us",
                  "GPU gap per kernel boundary (no programmatic dependent launch); assumed"),
    "sustained": (0.0, 0.025, 0.045, "share",
                  "the whole call over the sum of its steps timed one at a time. Measured: run 2's calls ran "
                  "3.5 / 3.5 / 0.6 % above their steps, its whole backwards 4.7 / 3.2 / 2.7 % above theirs "
                  "(cause not isolated: clocks under sustained load, or host gaps)"),
}


@dataclasses.dataclass(frozen=True)
class Rates:
    """One scenario's column of ``RATE_TABLE``."""

    hbm_tbs: float
    l2_tbs: float
    fwd_main: float
    fwd_main_softcap: float
    fwd_epilogue_us: float
    fwd_epilogue_softcap_us: float
    fwd_ctas_per_sm: int
    dz_main: float
    dz_main_softcap: float
    dz_epilogue_us: float
    dz_epilogue_softcap_us: float
    dz_ctas_per_sm: int
    cublas: float
    cublas_fill: str
    rmw_exposed: float
    triton_waves: int
    launch_us: float
    sustained: float


def scenario_rates(scenario: str) -> Rates:
    """The ``Rates`` of ``scenario`` (one of ``SCENARIOS``)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    i = SCENARIOS.index(scenario)
    return Rates(**{name: row[i] for name, row in RATE_TABLE.items()})


@dataclasses.dataclass(frozen=True)
class Shape:
    N: int
    D: int
    V: int
    softcap: float | None = None
    name: str = ""
    scored: int | None = None  # M, the scored rows of a masked call (gathered through ``rows``); None: all N

    @property
    def key(self) -> str:
        return f"{self.N},{self.D},{self.V}"

    @property
    def M(self) -> int:
        return self.N if self.scored is None else self.scored

    @property
    def gathered(self) -> bool:
        return self.scored is not None and self.scored < self.N


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


def _call(shape: Shape, fused: bool = True):
    import torch

    from fastkto.kernels import tiled

    return tiled.CallShape(tokens=shape.M, vocab=shape.V, dim=shape.D, input_dtype=torch.bfloat16,
                           gemm_dtype=torch.bfloat16, device_type="cuda", gathered=shape.gathered,
                           hidden_strided=False, weight_strided=False, softcap=shape.softcap is not None,
                           need_weight=True, need_bias=False, fused_accumulate=fused)


def plan(shape: Shape, budget_mib: float, gemm_path: str = "fused") -> tuple[int, int, int]:
    """(token rows n, vocabulary rows v, workspace bytes) of fastkto's backward plan for this shape on a GPU;
    ``gemm_path`` "fallback": torch without the fp32-accumulating ``addmm`` (a ``prod`` buffer in the workspace)."""
    from fastkto.kernels import tiled

    if gemm_path not in ("fused", "fallback"):
        raise ValueError(f"gemm_path must be 'fused' or 'fallback', got {gemm_path!r}")
    tiles, _ = _tiles()
    call = _call(shape, gemm_path == "fused")
    n, v = tiled.plan_tiles(call, tiles, int(budget_mib * 2**20), False)
    return n, v, tiled.buffers_nbytes(tiled.workspace_buffers(n, v, call, tiles))


def _forward_splits(shape: Shape) -> int:
    """The forward's vocabulary splits on a 132-SM GPU, by the kernel's own rule."""
    _, fl = _tiles()
    cfg = fl._GPU_CONFIGS[("fwd", "16")]
    return fl.vocab_splits(shape.V, cfg.BLOCK_V)  # V only: the same splits for any N and any GPU


def _chunks(total: int, size: int) -> list[int]:
    """The sizes of ``total`` rows cut into chunks of ``size`` (the last one short)."""
    return [min(size, total - i) for i in range(0, total, size)]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def wave_fill(programs: int, slots: int) -> float:
    """The share of ``slots`` (SMs x CTAs per SM) busy over the waves of a launch of ``programs`` equal programs:
    programs / (ceil(programs / slots) x slots); 1.0 is every wave full."""
    if programs <= 0:
        return 1.0
    return programs / (_cdiv(programs, slots) * slots)


def gemm_fill(m: int, n: int, how: str) -> float:
    """Wave fill of an (m x n)-output GEMM on the SMs: 1 for "none", else the best or worst over
    ``CUBLAS_TILES``."""
    if how == "none":
        return 1.0
    fills = [wave_fill(_cdiv(m, a) * _cdiv(n, b), SMS) for a, b in CUBLAS_TILES]
    return max(fills) if how == "best" else min(fills)


def _triton_fill(programs: int, ctas: int, r: Rates) -> float:
    """The wave fill of a Triton launch under ``r.triton_waves`` (see ``RATE_TABLE``)."""
    if not r.triton_waves:
        return 1.0
    return wave_fill(programs, SMS * (ctas if r.triton_waves == 2 else 1))


def _l2_note(main: float, cfg, r: Rates) -> str:
    """The L2 roof of a Triton tile: the main loop's rate and the L2 bandwidth it streams at."""
    fpb = _tile_flop_per_byte(cfg)
    rate = main * TFLOPS
    capped = bool(r.l2_tbs) and fpb * r.l2_tbs * 1e12 < rate
    if capped:
        rate = fpb * r.l2_tbs * 1e12
    return (f"main loop {rate / 1e12:.0f} TFLOP/s = {rate / fpb / 1e12:.1f} TB/s from L2 at {fpb:.0f} FLOP/B"
            + (" (the L2 roof)" if capped else ""))


def _triton_ms(flops: float, launches: list[tuple[int, int]], main: float, epilogue_us: float, ctas: int,
               tile_flop_per_byte: float, r: Rates) -> float:
    """Compute time (ms) of a Triton kernel's launches, each (programs, 128 x 128 tiles): the main loops at
    min(main x 790, L2 roof) and an epilogue per tile, each launch stretched by its waves' fill."""
    rate = main * TFLOPS
    if r.l2_tbs:
        rate = min(rate, tile_flop_per_byte * r.l2_tbs * 1e12)
    total = sum(t for _, t in launches) or 1
    ms = 0.0
    for programs, t in launches:  # each launch's share of the work, stretched by its last wave
        work = (flops * t / total) / rate + t * epilogue_us * 1e-6 / SMS
        ms += 1e3 * work / _triton_fill(programs, ctas, r)
    return ms


def steps(shape: Shape, budget_mib: float = 128, scenario: str = "optimistic", gemm_path: str = "fused",
          tile: tuple[int, int] | None = None, splits: int | None = None) -> list[dict]:
    """The model's steps for one shape in one scenario: dicts with step, flops, hbm_bytes, predicted_ms, bound,
    note (and the last, "total"). ``gemm_path`` "fallback": torch without the fp32-accumulating ``addmm``.
    ``tile`` (token rows, vocabulary rows) and ``splits`` override the plan and the forward's splits (to model a
    run made with another plan)."""
    r = scenario_rates(scenario)
    M, D, V = shape.M, shape.D, shape.V
    n, v, _ = plan(shape, budget_mib, gemm_path)
    if tile is not None:
        n, v = tile
    n, v = min(n, M), min(v, V)
    n_chunks, v_chunks = _chunks(M, n), _chunks(V, v)
    tn, tv = len(n_chunks), len(v_chunks)
    gemm = 2.0 * M * D * V
    softcap = shape.softcap is not None
    _, fl = _tiles()
    cfg_f, cfg_z = fl.gpu_configs()[("fwd", "16")], fl.gpu_configs()[("dz", "16")]
    splits = splits or _forward_splits(shape)
    fused = gemm_path == "fused"
    direct = tn == 1  # one token chunk: the dW GEMM writes the bf16 weight gradient (tiled.direct_dw)

    # forward: one launch of token tiles x splits programs, then the splits' merge (8 small kernels a split)
    tiles_n = _cdiv(M, cfg_f.BLOCK_N)
    resident_tiles = max(1, SMS // splits)
    fwd_waves = _cdiv(tiles_n, resident_tiles)
    fwd_tiles = tiles_n * _cdiv(V, cfg_f.BLOCK_V)
    fwd_ms = _triton_ms(gemm, [(tiles_n * splits, fwd_tiles)],
                        r.fwd_main_softcap if softcap else r.fwd_main,
                        r.fwd_epilogue_softcap_us if softcap else r.fwd_epilogue_us, r.fwd_ctas_per_sm,
                        _tile_flop_per_byte(cfg_f), r)
    merge_kernels = 8 * splits - 2 if splits > 1 else 0
    out = [dict(step="forward (Triton)", flops=gemm, compute_ms=fwd_ms, kernels=1 + merge_kernels,
                hbm_bytes=M * D * BF16 + fwd_waves * V * D * BF16 + 12 * M * splits,
                note=f"{splits} vocabulary splits: {tiles_n * splits} programs, "
                     f"{_triton_fill(tiles_n * splits, r.fwd_ctas_per_sm, r):.0%} wave fill; "
                     f"{fwd_waves} wave(s) of resident token tiles; "
                     + _l2_note(r.fwd_main_softcap if softcap else r.fwd_main, cfg_f, r))]

    # recompute: one launch per (n x v) tile, a program per 128 x 128 piece
    w_chunk = v * D * BF16
    w_reads = 1 if w_chunk <= L2 // 2 else _cdiv(n, 8 * 128)
    dz_launches = [(_cdiv(nc, cfg_z.BLOCK_N) * _cdiv(vc, cfg_z.BLOCK_V),) * 2 for vc in v_chunks for nc in n_chunks]
    dz_ms = _triton_ms(gemm, dz_launches,
                       r.dz_main_softcap if softcap else r.dz_main,
                       r.dz_epilogue_softcap_us if softcap else r.dz_epilogue_us, r.dz_ctas_per_sm,
                       _tile_flop_per_byte(cfg_z), r)
    dz_fill = sum(t for _, t in dz_launches) / sum(
        t / _triton_fill(p, r.dz_ctas_per_sm, r) for p, t in dz_launches)
    out.append(dict(step="recompute dz (Triton)", flops=gemm, compute_ms=dz_ms, kernels=tn * tv,
                    hbm_bytes=tv * M * D * BF16 + tn * w_reads * V * D * BF16 + M * V * BF16,
                    note=f"{tn} x {tv} tiles of {n} x {v}; dz bf16; {dz_fill:.0%} wave fill; "
                         + _l2_note(r.dz_main_softcap if softcap else r.dz_main, cfg_z, r)))

    # the GEMMs, launch by launch: (flops, output rows, output cols, C bytes in the GEMM, bytes of a fallback add_)
    acc_c, acc_add = (8, 0) if fused else (4, 12)  # fallback: product to ``prod`` (4), add_ reads 2, writes 1
    dh = [(2.0 * nc * vc * D, nc, D, (4 if i == 0 else acc_c) * nc * D, (0 if i == 0 else acc_add) * nc * D)
          for i, vc in enumerate(v_chunks) for nc in n_chunks]
    dw = [(2.0 * nc * vc * D, vc, D, (BF16 if direct else 4 if j == 0 else acc_c) * vc * D,
           (0 if direct or j == 0 else acc_add) * vc * D)
          for vc in v_chunks for j, nc in enumerate(n_chunks)]
    for name, launches, operands, note in (
            ("dH += dz @ W (cuBLAS)", dh, M * V * BF16 + tn * V * D * BF16,
             "fp32 accumulator read + written once per vocabulary chunk"),
            ("dW += dz.T @ H (cuBLAS)", dw, M * V * BF16 + tv * M * D * BF16,
             "one token chunk: written straight into the bf16 weight gradient" if direct else
             "fp32 chunk accumulator read + written once per token chunk")):
        compute = sum(1e3 * f / (r.cublas * TFLOPS * gemm_fill(a, b, r.cublas_fill)) for f, a, b, _, _ in launches)
        c_bytes = sum(c for *_, c, _ in launches)
        add_bytes = sum(x for *_, x in launches)
        fill = 1e3 * gemm / (r.cublas * TFLOPS) / compute
        out.append(dict(step=name, flops=gemm, compute_ms=compute, c_bytes=c_bytes, add_bytes=add_bytes,
                        kernels=len(launches) + sum(1 for *_, x in launches if x),
                        hbm_bytes=operands + c_bytes + add_bytes,
                        note=note + ("" if fused else "; fallback: product to an fp32 buffer, then add_")
                        + (f"; {fill:.0%} wave fill" if r.cublas_fill != "none" else "")))

    # casts (the dW chunks when they are fp32, dH to bf16 or scattered into the zeroed bf16 gradient of a masked
    # call) and, for a masked call, the scored rows of H gathered (once, or per tile with several token chunks)
    cast = (4 + 2) * V * D if not direct else 0
    dh_cast = (4 + 2) * M * D if not shape.gathered else BF16 * shape.N * D + 10 * M * D
    gathers = (1 if direct else tn * tv) if shape.gathered else 0
    out.append(dict(step="epilogue (casts)", flops=0.0, compute_ms=0.0,
                    kernels=(tv if not direct else 0) + 1 + gathers,
                    hbm_bytes=cast + dh_cast + (0 if not gathers else (1 if direct else tv) * 4 * M * D),
                    note=("dW chunks and dH to bf16" if not direct else "dH to bf16")
                    + (f"; masked: {gathers} gather(s) of the scored H rows, dH scattered" if shape.gathered else "")))

    for s in out:
        _predict(s, r)
    return _with_total(out, r, gemm, scenario)


def _predict(s: dict, r: Rates) -> None:
    """A step's predicted_ms and bound from its compute time, bytes and kernels (which it then drops)."""
    hbm = r.hbm_tbs * 1e12
    exposed = r.rmw_exposed * s.get("c_bytes", 0) + s.get("add_bytes", 0)  # never under the products
    mem_ms = 1e3 * (s["hbm_bytes"] - exposed) / hbm
    s["predicted_ms"] = max(s["compute_ms"], mem_ms) + 1e3 * exposed / hbm + 1e-3 * s["kernels"] * r.launch_us
    s["bound"] = "compute" if s["compute_ms"] >= mem_ms else "memory"
    for k in ("compute_ms", "c_bytes", "add_bytes", "kernels"):
        s.pop(k, None)


def _with_total(out: list[dict], r: Rates, gemm: float, scenario: str) -> list[dict]:
    """``out`` with the sustained-load and total rows added, every row tagged with the scenario."""
    steps_ms = sum(s["predicted_ms"] for s in out)
    out.append(dict(step="sustained (whole call)", flops=0.0, hbm_bytes=0, predicted_ms=r.sustained * steps_ms,
                    bound="", note=f"{r.sustained:.1%} over the steps timed one at a time"))
    total_ms = sum(s["predicted_ms"] for s in out)
    out.append(dict(step="total", flops=4 * gemm, hbm_bytes=sum(s["hbm_bytes"] for s in out),
                    predicted_ms=total_ms, bound="",
                    note=f"{4 * gemm / (total_ms / 1e3) / TFLOPS:.0%} of 790 TFLOP/s on 8NDV; target <= "
                         f"{4 * gemm / (TARGET_FRACTION * TFLOPS) * 1e3:.0f} ms"))
    for s in out:
        s["scenario"] = scenario
    return out


def epilogue_plan(shape: Shape, budget_mib: float) -> tuple[int, int, int]:
    """(token rows, vocabulary rows, workspace bytes) of the cuBLAS-and-epilogue path's plan on a GPU (its blocks
    hold fp32 raw logits beside the bf16 dz, so they are smaller than the fused path's for the same budget)."""
    import torch

    from fastkto.kernels import gemm_epilogue as ge
    from fastkto.kernels import tiled

    maker = dataclasses.replace(ge.TILE_MAKER, align=ge.GPU_ALIGN)
    call = dataclasses.replace(_call(shape), input_dtype=torch.bfloat16)
    n, v = tiled.plan_tiles(call, maker, int(budget_mib * 2**20), False)
    return n, v, tiled.buffers_nbytes(tiled.workspace_buffers(n, v, call, maker))


def epilogue_steps(shape: Shape, budget_mib: float = 128, scenario: str = "central") -> list[dict]:
    """The model of the cuBLAS-and-epilogue path (``kernels/gemm_epilogue.py``, ``backend="cublas"``): per block
    of its plan, the logits are a cuBLAS GEMM writing fp32 (4 bytes per logit, exposed like every GEMM's C
    traffic) and a Triton epilogue reading them (the forward's fold: 4 bytes per logit; the backward's dz: 4 read,
    2 written), memory-bound at ``hbm_tbs``; the gradient GEMMs and casts are the fused path's, with this plan's
    tiles. No GPU has timed this path: the rows say what the first run should find."""
    r = scenario_rates(scenario)
    n, v, _ = epilogue_plan(shape, budget_mib)
    n, v = min(n, shape.M), min(v, shape.V)
    blocks = [(nc, vc) for vc in _chunks(shape.V, v) for nc in _chunks(shape.M, n)]
    logits = shape.M * shape.V
    gemm = 2.0 * shape.M * shape.D * shape.V
    gemm_ms = sum(1e3 * 2.0 * nc * vc * shape.D / (r.cublas * TFLOPS * gemm_fill(nc, vc, r.cublas_fill))
                  for nc, vc in blocks)
    operands = len(_chunks(shape.V, v)) * shape.M * shape.D * BF16 + shape.V * shape.D * BF16
    out = []
    for name, epilogue, epi_bytes in (("forward", "fold", 4), ("recompute", "dz", 6)):
        out.append(dict(step=f"{name} logits (cuBLAS)", flops=gemm, compute_ms=gemm_ms, c_bytes=4 * logits,
                        kernels=len(blocks), hbm_bytes=operands + 4 * logits,
                        note=f"{len(blocks)} blocks of {n} x {v}, fp32 output"))
        out.append(dict(step=f"{epilogue} epilogue (Triton)", flops=0.0, compute_ms=0.0, kernels=len(blocks),
                        hbm_bytes=epi_bytes * logits, note=f"{epi_bytes} bytes per logit, memory-bound"))
    for s in out:
        _predict(s, r)
    tail = [s for s in steps(shape, budget_mib, scenario, tile=(n, v))
            if s["step"].startswith(("dH", "dW", "epilogue (casts)"))]
    return _with_total(out + tail, r, gemm, scenario)


def _tile_flop_per_byte(cfg) -> float:
    """FLOP per byte a 16-bit (BLOCK_N x BLOCK_V x BLOCK_D) tile streams from L2 per k-step: 2 BN BV BD flops over
    (BN + BV) BD x 2 bytes = BN BV / (BN + BV); 64 for 128 x 128."""
    return cfg.BLOCK_N * cfg.BLOCK_V / (cfg.BLOCK_N + cfg.BLOCK_V)


def peak_bytes(shape: Shape, budget_mib: float = 128, gemm_path: str = "fused", maker: str = "fused") -> dict:
    """Predicted memory beyond the inputs for forward + backward. Outside the workspace budget: the bf16 weight
    gradient, the (M, D) fp32 hidden gradient and the per-token vectors. Inside it, at different times: the
    workspace (the tile loop) and then the bf16 hidden gradient (the cast of the fp32 one, made after the loop
    frees the workspace; for a masked call the zeroed (N, D) gradient plus one cast chunk): the peak takes the
    larger of the two, never their sum."""
    from fastkto.kernels import tiled

    _, _, ws = epilogue_plan(shape, budget_mib) if maker == "epilogue" else plan(shape, budget_mib, gemm_path)
    M, N, D, V = shape.M, shape.N, shape.D, shape.V
    dh_cast = BF16 * N * D + (min(int(budget_mib * 2**20), BF16 * M * D) if shape.gathered else 0)
    out = {"weight_grad": BF16 * V * D, "dh_fp32": 4 * M * D, "per_token": tiled.PER_TOKEN_BYTES * M,
           "workspace": ws, "dh_cast": dh_cast}
    out["outside_budget"] = out["weight_grad"] + out["dh_fp32"] + out["per_token"]
    out["peak"] = out["outside_budget"] + max(ws, dh_cast)
    # the floor with fp32 accumulation of dH: the two bf16 gradients' outputs and the fp32 accumulator, for any
    # workspace (the bf16 hidden gradient is the larger of the two in-budget terms at a small budget)
    out["floor_fp32_dh"] = out["outside_budget"] + dh_cast
    return out


def model_steps(shape: Shape, budget_mib: float, scenario: str, gemm_path: str = "fused",
                maker: str = "fused") -> list[dict]:
    """``steps`` for the fused Triton tile maker, ``epilogue_steps`` for ``maker`` "epilogue" (fused GEMMs only)."""
    if maker == "epilogue":
        if gemm_path != "fused":
            raise ValueError("the epilogue tile maker is modelled on the fused GEMM path only")
        return epilogue_steps(shape, budget_mib, scenario)
    return steps(shape, budget_mib, scenario, gemm_path)


def rows(shapes: list[Shape], budget_mib: float, scenarios=SCENARIOS, gemm_path: str = "fused",
         maker: str = "fused") -> list[dict]:
    """The JSON rows: one per (scenario, shape, step), with keys scenario, shape, step, flops, hbm_bytes,
    predicted_ms, maker."""
    out = []
    for scenario in scenarios:
        for shape in shapes:
            for s in model_steps(shape, budget_mib, scenario, gemm_path, maker):
                out.append({"scenario": scenario, "shape": shape.key, "step": s["step"], "flops": s["flops"],
                            "hbm_bytes": s["hbm_bytes"], "predicted_ms": s["predicted_ms"], "maker": maker})
    return out


def _print_rates() -> None:
    print(f"Rates (fractions 'x 790' are of {TFLOPS / 1e12:.0f} TFLOP/s, the measured cuBLAS bf16 8192^3 rate)")
    print(f"  {'rate':<24} {'optimistic':>10} {'central':>9} {'pessim.':>9}  {'unit':<9} source")
    for name, (*vals, unit, source) in RATE_TABLE.items():
        print(f"  {name:<24} " + " ".join(f"{v!s:>{w}}" for v, w in zip(vals, (10, 9, 9))) + f"  {unit:<9} {source}")


def _print_model(shapes: list[Shape], budget_mib: float, scenarios=SCENARIOS, gemm_path: str = "fused",
                 maker: str = "fused") -> None:
    print(f"H200 model, {', '.join(scenarios)} (rates: --rates); workspace {budget_mib:g} MiB; GEMM path "
          f"{gemm_path}; tile maker {maker}")
    for shape in shapes:
        n, v, ws = epilogue_plan(shape, budget_mib) if maker == "epilogue" else plan(shape, budget_mib, gemm_path)
        print(f"\n{shape.name or shape.key}  (N={shape.N}, D={shape.D}, V={shape.V}"
              f"{f', M={shape.M} scored (gathered)' if shape.gathered else ''}"
              f"{f', soft-cap {shape.softcap:g}' if shape.softcap else ''}): tiles {n} x {v}, "
              f"workspace {ws / 2**20:.0f} MiB")
        by = {sc: model_steps(shape, budget_mib, sc, gemm_path, maker) for sc in scenarios}
        first = by[scenarios[0]]
        print(f"  {'step':<26} {'GFLOP':>9} {'HBM GB':>8} " + " ".join(f"{sc[:11]:>11}" for sc in scenarios)
              + "  (ms)  note (" + scenarios[-1] + ")")
        for i, s in enumerate(first):
            print(f"  {s['step']:<26} {s['flops'] / 1e9:>9.0f} {s['hbm_bytes'] / 1e9:>8.2f} "
                  + " ".join(f"{by[sc][i]['predicted_ms']:>11.2f}" for sc in scenarios)
                  + f"        {by[scenarios[-1]][i]['note']}")
        mem = peak_bytes(shape, budget_mib, gemm_path, maker)
        mib = {k: val / 2**20 for k, val in mem.items()}
        print(f"  peak beyond the inputs: {mib['peak']:.0f} MiB = outside the budget {mib['outside_budget']:.0f} "
              f"(bf16 dW {mib['weight_grad']:.0f} + fp32 dH {mib['dh_fp32']:.0f} + per-token "
              f"{mib['per_token']:.1f}) + max(workspace {mib['workspace']:.0f}, bf16 dH {mib['dh_cast']:.0f}); "
              f"floor with fp32 dH {mib['floor_fp32_dh']:.0f} MiB")


def measured_steps(path) -> dict:
    """{shape key: {step: ms, "total": the whole call's ms}} of a ``--measure`` report (measured.json): the steps
    timed one at a time and fastkto-triton's forward + backward on random inputs."""
    report = json.loads(Path(path).read_text())
    out = {}
    for r in report.get("measured") or []:
        got = dict(r.get("steps") or {})
        whole = ((r.get("methods") or {}).get("fastkto-triton") or {}).get("random")
        if whole:
            got["total"] = whole["ms"]
        out[r["shape"]] = got
    return out


def _print_compare(shapes: list[Shape], budget_mib: float, path, gemm_path: str = "fused") -> None:
    """Each scenario's prediction next to what a ``--measure`` report measured, step by step."""
    measured = measured_steps(path)
    nan = float("nan")
    for shape in shapes:
        got = measured.get(shape.key)
        if got is None:
            print(f"\n{shape.name or shape.key}: not in {path}")
            continue
        by = {sc: {s["step"]: s["predicted_ms"] for s in steps(shape, budget_mib, sc, gemm_path)}
              for sc in SCENARIOS}
        print(f"\n{shape.name or shape.key}  (ms; measured: {path})")
        print(f"  {'step':<26} {'measured':>9} " + " ".join(f"{sc:>11}" for sc in SCENARIOS) + "  central/measured")
        for step in [k for k in by["central"] if k in got]:
            ratio = f"{by['central'][step] / got[step] - 1:+.1%}" if got[step] else ""
            print(f"  {step:<26} {got[step]:>9.2f} " + " ".join(f"{by[sc].get(step, nan):>11.2f}" for sc in SCENARIOS)
                  + f"  {ratio}")


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
        "fastkto-cublas": lambda h, w: fastkto.fused_logprobs(h, w, labels, softcap=sc, backend="cublas"),
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
        interpreted = method in ("fastkto-triton", "fastkto-cublas") and fl.INTERPRET
        reason = None if interpreted else peers.skip_reason(method, device)
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
                    meta = k.metadata  # the launch options, so that a sweep's rows can be told apart
                    out.append({"kernel": name, "n_regs": k.n_regs, "n_spills": k.n_spills,
                                "shared": meta.shared, **{o: getattr(meta, o, None) for o in
                                                          ("num_warps", "num_stages", "maxnreg")},
                                "constants": {str(c): str(v) for c, v in
                                              getattr(k, "constants", {}).items()} if hasattr(k, "constants")
                                else None})
                except Exception as exc:  # noqa: BLE001
                    out.append({"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return out


# The tile configurations the GPU check times (16-bit inputs; BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages
# and optionally a register cap, ``fused_logprob.KernelConfig``). The first of each is the default (run 3 made the
# forward's 4 stages so). The default stays fixed (no autotuning at run time: plans and bits must not depend on a
# search); the sweep tells one GPU run which to make the default, and records a configuration that fails to
# compile or launch. 64-row and 64-column tiles were 22-52 % slower in run 1: dropped.
# The capped rows: under Triton 3.6 (the GPU image's) ptxas gives every 16-bit forward variant all 255 registers,
# though each compiles without spills under a 232 cap (benchmarks/results/compile/compile_report_triton3.6.md);
# one block per SM either way, so the cap costs or gains only through ptxas' schedule: the run measures which.
# Compiled for sm_90 with the capped shapes (tools.compile_check --config fwd/16=128,128,64,8,4,232 --config
# dz/16=128,128,64,8,3,232): no spills under 3.6; under 3.9 the forward's soft-cap variants spill 8 B.
# tools/sass_profile.py predicts both rows: the capped forward within 0.2 % (3 % more fold instructions on sm_90),
# the capped dz slower without a soft-cap (201 registers instead of 128: one CTA per SM instead of two).
SWEEP_CONFIGS = {
    "fwd": [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 5), (128, 256, 64, 8, 3),
            (128, 256, 64, 8, 4), (128, 128, 32, 8, 4), (128, 128, 64, 8, 4, 232)],
    "dz": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
           (128, 128, 64, 8, 3, 232)],
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
        try:
            by = {sc: {s["step"]: s["predicted_ms"] for s in steps(shape, budget_mib, sc)} for sc in SCENARIOS}
        except Exception as exc:  # noqa: BLE001 - the measurements print without the model
            print(f"  the model failed: {type(exc).__name__}: {exc}")
            by = {sc: {} for sc in SCENARIOS}
        print(f"\n{r.get('name') or r['shape']}: cuBLAS bf16 matmul {r.get('matmul_floor_ms', nan):.2f} ms "
              f"({r.get('matmul_tflops', nan):.0f} TFLOP/s); bitwise repeat: {r.get('bitwise_repeat')}")
        if "plan" in r:
            p = r["plan"]
            print(f"  plan: tiles {p['tile'][0]} x {p['tile'][1]} ({p['token_chunks']} x {p['vocab_chunks']}), "
                  f"workspace {p['workspace_mib']:.0f} MiB, forward {p['forward_splits']} splits "
                  f"({p['forward_programs']} programs on {p['sms']} SMs); GEMM path: {p['gemm_path']}")
        print(f"  {'step':<26} {'measured ms':>12} " + " ".join(f"{sc:>11}" for sc in SCENARIOS))
        for step, ms in r["steps"].items():
            print(f"  {step:<26} {ms:>12.2f} " + " ".join(f"{by[sc].get(step, nan):>11.2f}" for sc in SCENARIOS))
        if r["steps"]:
            print(f"  {'total (sum of the steps)':<26} {sum(r['steps'].values()):>12.2f} "
                  + " ".join(f"{by[sc].get('total', nan):>11.2f}" for sc in SCENARIOS))
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
        try:  # the registers the device's ptxas gave each configuration (the capped rows among them)
            report["kernels"] = _kernel_registers()
        except Exception as exc:  # noqa: BLE001
            report["errors"]["registers"] = f"{type(exc).__name__}: {exc}"[:500]
        write()
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
    p.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all", help="the model's scenario(s)")
    p.add_argument("--gemm-path", choices=("fused", "fallback"), default="fused",
                   help="fallback: torch without addmm(fp32 acc, bf16, bf16, out_dtype=fp32)")
    p.add_argument("--tile-maker", choices=("fused", "epilogue"), default="fused",
                   help="epilogue: the cuBLAS logits + Triton epilogue path (backend 'cublas'), not yet timed")
    p.add_argument("--scored", type=int, default=None,
                   help="a masked call: M scored rows of each --shape's N (gathered hidden states)")
    p.add_argument("--rates", action="store_true", help="print the rate table and each rate's source")
    p.add_argument("--compare", type=Path, default=None, metavar="MEASURED_JSON",
                   help="each scenario next to a --measure report's steps")
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
    if args.scored is not None:
        if not all(0 < args.scored <= s.N for s in shapes):
            p.error(f"--scored must be in 1..N of every shape, got {args.scored}")
        shapes = [dataclasses.replace(s, scored=args.scored) for s in shapes]
    if args.peer_worker:
        return _peer_worker(args)
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    if args.rates:
        _print_rates()
        return 0
    if args.compare:
        _print_compare(shapes, budget, args.compare, args.gemm_path)
        return 0
    if not args.measure:
        if args.json:
            print(json.dumps(rows(shapes, budget, scenarios, args.gemm_path, args.tile_maker), indent=1))
        else:
            _print_model(shapes, budget, scenarios, args.gemm_path, args.tile_maker)
        return 0
    import torch

    if args.device in (None, "cuda") and not torch.cuda.is_available():
        print("--measure needs a CUDA device (or --device cpu under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    return _measure_all(args, shapes, budget)


if __name__ == "__main__":
    raise SystemExit(main())
