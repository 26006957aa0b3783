"""Compile every fastkto Triton kernel for sm_80 and sm_90 on a machine without a GPU, and check the result.

Triton's interpreter runs kernels that a GPU compiler rejects or compiles badly, so CI compiles each kernel, for
every launch configuration the dispatch can pick (``fused_logprob.gpu_configs`` / ``select_config``), with
``triton.compile`` for ``GPUTarget("cuda", 80, 32)`` (A100) and ``GPUTarget("cuda", 90, 32)`` (H100 / H200), and
checks what a kernel engineer checks by hand:

- no register spills: ``cuobjdump -res-usage`` on the cubin must report LOCAL:0 (per-thread local memory; also
  what Triton reports as ``n_spills``) and STACK:0. ptxas places spills in the stack frame, so STACK is the one
  that catches them: 8 B to 4 KiB frames with 8 to 4136 bytes of spill stores are what this check found before the
  tile shapes were changed (``ptxas -v`` on the same PTX lists the spill stores behind each frame);
- at most 255 registers per thread (ptxas' hard limit, so a larger value means a parsing error), and headroom: a
  variant at 255 must also compile without spills under a ``HEADROOM_CAP`` (232) register cap;
- shared memory (Triton's dynamic allocation plus the cubin's static part) within what one block can opt in to:
  163 KiB on sm_80, 227 KiB on sm_90;
- the matrix products use the tensor-core instruction the target offers, read from the PTX: Hopper's ``wgmma``
  on sm_90 and ``mma.sync`` on sm_80 for bf16 / fp16 and for fp32 with tf32 allowed, with the operands' type,
  and no other kind (a product that falls back from wgmma to mma.sync on sm_90 fails). fp32 under
  ``torch.get_float32_matmul_precision() == "highest"`` asks for IEEE fp32 products, which no tensor core
  computes; there the check asserts that no tensor-core instruction appears (Triton emits FMA loops).

The variant matrix. Each kernel has constexpr switches (HAS_BIAS, HAS_SOFTCAP; the forward also HAS_ROWS: the
backward's tile loop hands the dz kernel contiguous rows). They add loads and element-wise work around the same
tile loop, but register allocation is not monotone in them: with an earlier backward kernel, "none" and "all on"
compiled cleanly on sm_90 while "softcap" alone and "bias" alone spilled. So bf16 and fp32 (with IEEE and with
tf32 products) are compiled for every combination the dispatch can launch (8 for the forward, 4 for the dz
kernel), for every kernel, configuration and target. fp16 differs from bf16 only in the operand type of the same
instructions (the full matrix gave identical registers, shared memory and stack for every pair), so by default it
is compiled only for the ends of the range (no switch, every switch): 80 compilations, about a minute of CPU
with an empty Triton cache, seconds with a warm one. ``--exhaustive`` adds the remaining fp16 combinations (96).

Constexprs come from the dispatch itself (``fused_logprob.select_config`` and ``launch_meta`` on meta tensors), so the
check follows the launch code rather than a copy of it. Integer arguments that are multiples of 16 in every real
model (the hidden size D, the row strides, the columns per split, the dz tile's row stride, which the loop pads to
16, and the chunk's first vocabulary row) are compiled with Triton's divisibility-by-16 specialization, as a
launch with such a model gets; the token count M and the vocabulary size V (of a call, or of a tile) are left
unspecialized, as for any M and V that are not multiples of 16.

Commands::

    python -m tools.compile_check --out benchmarks/results/compile/compile_report.md   # the kept table
    python -m tools.compile_check --only dz-bf16-sm90 --config dz/16=128,128,64,8,3  # try a tile shape

Kernels are interpreter objects when TRITON_INTERPRET=1 was set before Triton was imported (the CPU test suite),
so ``run_checks`` then compiles in a child Python with the interpreter switched off.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["Case", "Result", "cases", "stats_cases", "compile_kernel", "compile_case", "run_checks", "check_headroom",
           "problems", "expected_mma", "parse_res_usage", "tensor_core_ops", "format_table", "summary", "main",
           "KERNELS", "DTYPES", "TARGETS", "SHARED_LIMIT", "MAX_REGISTERS", "HEADROOM_CAP"]

TARGETS = (80, 90)
# the largest shared memory one block may opt in to (cudaFuncAttributeMaxDynamicSharedMemorySize), in bytes
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255
# A variant at the ceiling is compiled again under this cap: spill-free there, its 255 registers are ptxas' choice
# (it takes what the launch allows when that helps its schedule; Triton 3.6's ptxas does so for every 16-bit
# forward), not what the kernel needs, and ~10 % of the file is left for a compiler or code change. 8 warps at
# 129-255 registers give one block per SM either way, so the cap would not change occupancy.
HEADROOM_CAP = 232
NOT_CAPPED, CAP_FAILED = -1, -2  # Result.capped_spill's two values that are not byte counts
# dtype name -> (Triton pointer element type, the dispatch's width key in gpu_configs(), torch dtype name)
DTYPES = {"bf16": ("bf16", "16", "bfloat16"), "fp16": ("fp16", "16", "float16"), "fp32": ("fp32", "32", "float32")}
# torch.get_float32_matmul_precision() values that make the dispatch pick each fp32 product precision
_MATMUL_PRECISION = {"ieee": "highest", "tf32": "high"}
KERNELS = {"fwd": "_logprob_fwd_kernel", "dz": "_logprob_dz_kernel"}
# Runtime (non-constexpr) arguments by name; the pointers are typed in _arg_types
_INT_ARGS = {"M", "V", "D", "stride_h", "stride_w", "cols_per_split", "stride_dz", "v_offset", "stat_stride"}
_ALIGNED_INTS = {"D", "stride_h", "stride_w", "cols_per_split", "stride_dz", "v_offset"}
_FLOAT_ARGS = {"softcap", "inv_temp"}
_FP32_PTRS = {"MAX_OUT", "SUM_OUT", "TGT_OUT", "STAT_OUT", "LSE", "GRAD", "GRAD_ENT", "ENT"}


@dataclass(frozen=True)
class Case:
    """One compilation: a kernel ("fwd", "dz") as the dispatch launches it for a dtype and switches.

    ``config`` (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) replaces the dispatch's tile shape and
    ``maxnreg`` caps the registers per thread; both are for trying shapes and for testing the checks.
    """

    kernel: str
    dtype: str  # "bf16", "fp16" or "fp32"
    precision: str  # "ieee" or "tf32"; only fp32 products depend on it
    target: int  # compute capability: 80 or 90
    variant: str  # the switches that are on: "none", "bias+rows+softcap", ...
    switches: tuple[tuple[str, bool], ...]  # sorted (name, on) pairs of _switch_sets
    config: tuple[int, ...] | None = None  # KernelConfig's fields: 5, or 6 with its register cap
    maxnreg: int | None = None

    @property
    def label(self) -> str:
        dtype = f"{self.dtype}-{self.precision}" if self.dtype == "fp32" else self.dtype
        return f"{self.kernel}-{dtype}-sm{self.target}-{self.variant}"


@dataclass
class Result:
    """What the compiler produced for one Case (sizes in bytes)."""

    case: Case
    config: str = ""  # the tile shape compiled, e.g. "N64 V128 D32 w8 s3"
    registers: int = -1
    shared: int = -1  # dynamic (Triton's allocation) + static (from the cubin)
    local: int = -1  # local memory per thread
    stack: int = -1  # stack frame per thread: where ptxas puts spills
    mma: dict[str, int] = field(default_factory=dict)  # "wgmma.bf16" -> PTX instruction count, ...
    ptx_sha256: str = ""  # identifies the PTX, so a GPU run can confirm it launches exactly this compilation
    # local + stack bytes when compiled again under HEADROOM_CAP registers (variants at 255 only), or NOT_CAPPED,
    # CAP_FAILED
    capped_spill: int = NOT_CAPPED
    capped_at: int = HEADROOM_CAP  # the cap of that compilation
    error: str = ""
    seconds: float = 0.0


def _switch_sets(kernel: str) -> list[dict[str, bool]]:
    """Every combination of constexpr switches the dispatch can launch this kernel with (the dz kernel reads the
    rows the tile loop gathered, so it has no HAS_ROWS)."""
    out = []
    for bias, rows, softcap in itertools.product((False, True), repeat=3):
        if kernel == "dz" and rows:
            continue
        out.append(dict(has_bias=bias, has_rows=rows, has_softcap=softcap))
    return out


def _stats_switch_sets(kernel: str) -> list[dict]:
    """The token-statistics variants (``fused_logprob``: the forward's STATS levels 1 and 2, the dz kernel's
    ENT_GRAD) over every switch combination the dispatch can launch."""
    out = []
    for sw in _switch_sets(kernel):
        if kernel == "fwd":
            out += [dict(sw, stats=level) for level in (1, 2)]
        else:
            out.append(dict(sw, ent_grad=True))
    return out


def _variant_name(kernel: str, sw: dict) -> str:
    """E.g. "bias+softcap", "none", "softcap+stats2", "entgrad"."""
    parts = [k.removeprefix("has_") for k in ("has_bias", "has_rows", "has_softcap") if sw[k]]
    if sw.get("stats"):
        parts.append(f"stats{sw['stats']}")
    if sw.get("ent_grad"):
        parts.append("entgrad")
    return "+".join(parts) or "none"


def _is_extreme(kernel: str, sw: dict[str, bool]) -> bool:
    """No switch on, or every switch the kernel has: fp16's share."""
    feats = [sw["has_bias"], sw["has_softcap"]] + ([sw["has_rows"]] if kernel == "fwd" else [])
    return not any(feats) or all(feats)


def cases(exhaustive: bool = False) -> list[Case]:
    """The compilation matrix: kernels x dtypes (x fp32 precisions) x targets x switch combinations.

    bf16 and fp32 (IEEE and tf32) get every combination the dispatch can launch; fp16, unless ``exhaustive``,
    only the extremes (see the module docstring for why).
    """
    out = []
    for kernel in KERNELS:
        for dtype in DTYPES:
            for precision in (("ieee", "tf32") if dtype == "fp32" else ("ieee",)):
                for target in TARGETS:
                    for sw in _switch_sets(kernel):
                        if dtype == "fp16" and not exhaustive and not _is_extreme(kernel, sw):
                            continue
                        out.append(Case(kernel, dtype, precision, target, _variant_name(kernel, sw),
                                        tuple(sorted(sw.items()))))
    return out


def stats_cases(exhaustive: bool = False) -> list[Case]:
    """The token-statistics variants' matrix (``fastkto.token_stats``): the forward at STATS 1 and 2 and the dz
    kernel with ENT_GRAD, kept apart from ``cases()`` (the plain kernels' matrix, whose reports are kept per Triton
    version). bf16 and fp32 (IEEE, tf32) get every switch combination, fp16 the extremes unless ``exhaustive``."""
    out = []
    for kernel in KERNELS:
        for dtype in DTYPES:
            for precision in (("ieee", "tf32") if dtype == "fp32" else ("ieee",)):
                for target in TARGETS:
                    for sw in _stats_switch_sets(kernel):
                        if dtype == "fp16" and not exhaustive and not _is_extreme(kernel, sw):
                            continue
                        out.append(Case(kernel, dtype, precision, target, _variant_name(kernel, sw),
                                        tuple(sorted(sw.items()))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Compiling (needs real JITFunctions: a process where TRITON_INTERPRET was not set when Triton was imported)


def _tool(name: str) -> str:
    """A CUDA binary: $TRITON_<NAME>_PATH, else the one in Triton's wheel (backends/nvidia/bin), else PATH."""
    import triton

    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    for candidate in (os.environ.get(f"TRITON_{name.upper()}_PATH", ""), str(shipped), shutil.which(name) or ""):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{name} not found: set TRITON_{name.upper()}_PATH, or install a Triton wheel that ships "
                            f"{shipped}")


def _launch_meta(case: Case):
    """(kernel, constexprs, options, config) as the dispatch launches this case: fused_logprob's own code on meta
    tensors, so the check cannot drift from the launch."""
    import torch

    from fastkto.kernels import fused_logprob as fl

    if fl.INTERPRET:
        raise RuntimeError("compile checks need compiled kernels: import Triton without TRITON_INTERPRET=1")
    sw = dict(case.switches)
    dtype = getattr(torch, DTYPES[case.dtype][2])
    stats_variant = bool(sw.get("stats")) or bool(sw.get("ent_grad"))
    cfg = fl.KernelConfig(*case.config) if case.config else fl.select_config(case.kernel, dtype, stats=stats_variant)
    x = torch.empty(0, dtype=dtype, device="meta")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(_MATMUL_PRECISION[case.precision])
    try:
        meta, _, _ = fl.launch_meta(case.kernel, dtype, x if sw["has_bias"] else None, x if sw["has_rows"] else None,
                                30.0 if sw["has_softcap"] else None, 1.0, cfg, stats=sw.get("stats", 0),
                                ent_grad=sw.get("ent_grad", False))
    finally:
        torch.set_float32_matmul_precision(previous)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    if "maxnreg" in meta:  # a configuration's own cap
        options["maxnreg"] = meta.pop("maxnreg")
    if case.maxnreg:
        options["maxnreg"] = case.maxnreg
    return getattr(fl, KERNELS[case.kernel]), meta, options, cfg


def _arg_types(case: Case, meta: dict) -> dict[str, str]:
    """Triton types of the runtime arguments, as the dispatch passes them."""
    dt = DTYPES[case.dtype][0]
    # B stands in as hidden when there is no bias; dz is written in the input dtype
    types = {name: "*" + dt for name in ("H", "W", "B", "DZ")}
    types.update(ROWS="*i64", LABELS="*i64")  # labels stand in for the rows when every token is scored
    types.update({name: "*fp32" for name in _FP32_PTRS})
    types.update({name: "i32" for name in _INT_ARGS})
    types.update({name: "fp32" for name in _FLOAT_ARGS})
    return types


def parse_res_usage(text: str) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the one function in ``cuobjdump -res-usage`` output."""
    lines = [ln for ln in text.splitlines() if "REG:" in ln]
    if len(lines) != 1:
        raise ValueError(f"expected one function in cuobjdump -res-usage output, got:\n{text}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", lines[0])}


def _res_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], check=True, capture_output=True,
                              text=True)
    return parse_res_usage(proc.stdout)


_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m64n\d+k\d+\.f32\.(bf16|f16|tf32)\b")
_MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.f32\.(bf16|f16|tf32)\b")


def tensor_core_ops(ptx: str) -> dict[str, int]:
    """PTX tensor-core instruction counts by kind and operand type, e.g. {"wgmma.bf16": 8}."""
    counts: dict[str, int] = {}
    for kind, pattern in (("wgmma", _WGMMA), ("mma.sync", _MMA_SYNC)):
        for operand in pattern.findall(ptx):
            key = f"{kind}.{operand}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def compile_kernel(case: Case):
    """(Triton's compiled kernel, the KernelConfig) for one case, built as a launch with the dispatch's constexprs
    and a typical model's alignment would build it; raises on a compiler error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, meta, options, cfg = _launch_meta(case)
    names = [p.name for p in fn.params]
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    if constexprs != set(meta):
        raise RuntimeError(f"{fn.__name__} has constexprs {sorted(constexprs)} but the dispatch passes "
                           f"{sorted(meta)}: update compile_check")
    types = _arg_types(case, meta)
    unknown = [n for n in names if n not in constexprs and n not in types]
    if unknown:
        raise RuntimeError(f"{fn.__name__}: no type known for arguments {unknown}: update compile_check")
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    # keys as argument-index paths: the form every Triton from 3.2 to 3.9 accepts
    constants = {(names.index(n),): v for n, v in meta.items()}
    # 16-byte alignment for the pointers (torch allocations) and the integers that are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in _ALIGNED_INTS}
    # enable_fp_fusion=True is the launch default of Triton 3.6 - 3.9; passing it keeps 3.9 from warning
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", case.target, 32),
                            options=dict(options, enable_fp_fusion=True))
    return kernel, cfg


def compile_case(case: Case) -> Result:
    """Compile one case with triton.compile for its target and measure it; errors are recorded, not raised."""
    start = time.perf_counter()
    result = Result(case)
    try:
        kernel, cfg = compile_kernel(case)
        result.config = f"N{cfg.BLOCK_N} V{cfg.BLOCK_V} D{cfg.BLOCK_D} w{cfg.num_warps} s{cfg.num_stages}" + (
            f" r{cfg.maxnreg}" if cfg.maxnreg else "")
        usage = _res_usage(kernel.asm["cubin"])
        result.registers, result.stack, result.local = usage["REG"], usage["STACK"], usage["LOCAL"]
        result.shared = kernel.metadata.shared + usage["SHARED"]
        result.mma = tensor_core_ops(kernel.asm["ptx"])
        result.ptx_sha256 = hashlib.sha256(kernel.asm["ptx"].encode()).hexdigest()
    except Exception as exc:  # noqa: BLE001 - a compiler failure is a result to report, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[-4000:]
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------------------------
# Checking and reporting (pure functions: importable anywhere, also under the interpreter)


def expected_mma(case: Case) -> str | None:
    """The tensor-core instruction every product of this case should use: "wgmma.bf16", ... or None for IEEE fp32.

    16-bit inputs and tf32 products run on tensor cores: wgmma (asynchronous warpgroup MMA) on sm_90, mma.sync
    (warp MMA) on sm_80. IEEE fp32 products have no tensor-core instruction on either chip.
    """
    operand = {"bf16": "bf16", "fp16": "f16"}.get(case.dtype, "tf32" if case.precision == "tf32" else None)
    if operand is None:
        return None
    return f"{'wgmma' if case.target >= 90 else 'mma.sync'}.{operand}"


def problems(result: Result) -> list[str]:
    """What a kernel engineer would object to in this result; empty when it passes."""
    case = result.case
    if result.error:
        return [f"compilation failed: {result.error}"]
    out = []
    if result.local:
        out.append(f"{result.local} bytes of local memory per thread (spills or local arrays)")
    if result.stack:
        out.append(f"{result.stack}-byte stack frame (register spills)")
    if not 0 < result.registers <= MAX_REGISTERS:
        out.append(f"{result.registers} registers per thread (expected 1..{MAX_REGISTERS})")
    elif result.registers == MAX_REGISTERS and result.capped_spill != 0:
        why = {NOT_CAPPED: "not compiled under a cap", CAP_FAILED: "its compilation under a cap failed"}.get(
            result.capped_spill, f"{result.capped_spill} B of spills under a {result.capped_at}-register cap")
        out.append(f"at the {MAX_REGISTERS}-register ceiling with no headroom shown ({why})")
    if result.shared > SHARED_LIMIT[case.target]:
        out.append(f"{result.shared} bytes of shared memory > the sm_{case.target} limit {SHARED_LIMIT[case.target]}")
    want = expected_mma(case)
    if want is None:
        if result.mma:
            out.append(f"IEEE fp32 products should not use tensor cores, found {result.mma}")
    elif set(result.mma) != {want}:
        out.append(f"expected every product on {want}, found {result.mma or 'no tensor-core instructions'}")
    return out


def format_table(results: list[Result]) -> str:
    """A markdown table, one row per result."""
    head = ("| kernel | config | dtype | target | variant | registers | shared (B) | local/spill (B) | stack (B) "
            f"| spill at {HEADROOM_CAP} regs (B) | wgmma | tensor-core ops (PTX count) | ok |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c = r.case
        dtype = f"{c.dtype} ({c.precision})" if c.dtype == "fp32" else c.dtype
        lead = f"| {KERNELS[c.kernel]} | {r.config} | {dtype} | sm_{c.target} | {c.variant} "
        if r.error:
            rows.append(lead + "| - | - | - | - | - | - | - | FAIL: compilation error |")
            continue
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(r.mma.items())) or "none (FMA)"
        wgmma = "yes" if any(k.startswith("wgmma") for k in r.mma) else "no"
        bad = problems(r)
        capped = {NOT_CAPPED: "-", CAP_FAILED: "failed"}.get(r.capped_spill, str(r.capped_spill))
        rows.append(lead + f"| {r.registers} | {r.shared} | {r.local} | {r.stack} | {capped} | {wgmma} | {ops} "
                    f"| {'FAIL: ' + '; '.join(bad) if bad else 'yes'} |")
    return "\n".join(rows)


def summary(results: list[Result]) -> str:
    """Per kernel, dtype and target: the range of registers and shared memory, and the largest spill."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if not r.error:
            c = r.case
            dtype = f"{c.dtype} ({c.precision})" if c.dtype == "fp32" else c.dtype
            groups.setdefault((KERNELS[c.kernel], r.config, dtype, f"sm_{c.target}"), []).append(r)
    rows = ["| kernel | config | dtype | target | variants | registers | shared (B) | max local+stack (B) |",
            "|---|---|---|---|---|---|---|---|"]
    for key, rs in groups.items():
        regs = sorted(r.registers for r in rs)
        smem = sorted(r.shared for r in rs)
        rows.append("| " + " | ".join(key) + f" | {len(rs)} | {regs[0]}-{regs[-1]} | {smem[0]}-{smem[-1]} "
                    f"| {max(r.local + r.stack for r in rs)} |")
    return "\n".join(rows)


def _report(results: list[Result], command: str, seconds: float) -> str:
    import platform

    import triton

    failed = sum(bool(problems(r)) for r in results)
    cpu = sum(r.seconds for r in results)  # wall time per compilation, Triton's cache hits included
    return "\n".join([
        "# Compile report: fastkto Triton kernels for sm_80 and sm_90",
        "",
        f"Generated by `{command}` with Triton {triton.__version__} on a {platform.machine()} machine without a GPU "
        f"({os.cpu_count()} CPUs) in {seconds:.0f} s (the compilations' wall times sum to {cpu:.0f} s): "
        f"{len(results)} compilations, {failed} failing.",
        "",
        "Shared memory is Triton's dynamic allocation plus the cubin's static part; limits: sm_80 "
        f"{SHARED_LIMIT[80]} B (163 KiB), sm_90 {SHARED_LIMIT[90]} B (227 KiB). Registers, local memory and stack "
        "come from `cuobjdump -res-usage` (from Triton's wheel); tensor-core instructions are counted in the PTX "
        "(a count of instructions in the unrolled code, not of executions). IEEE fp32 products have no tensor-core "
        "instruction, so those rows expect none. `tools/compile_check.py` documents the checks and the "
        "choice of variants.",
        "",
        "## Summary",
        "",
        summary(results),
        "",
        "## Every compilation",
        "",
        format_table(results),
        "",
    ])


def _compile_many(todo: list[Case], jobs: int) -> list[Result]:
    if jobs <= 1 or len(todo) <= 1:
        return [compile_case(c) for c in todo]
    # processes, not threads: most of the time is Python code generation and MLIR passes that hold the GIL;
    # spawned, not forked, so that a parent that has initialized CUDA (the GPU test run) is never forked
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_case, todo, chunksize=4))


def check_headroom(results: list[Result], jobs: int | None = None, cap: int = HEADROOM_CAP) -> list[Result]:
    """Compile every uncapped result at the 255-register ceiling again under ``cap`` registers and record its
    spills in ``capped_spill`` (in place); returns ``results``. ``run_checks`` does this for its own results."""
    at_ceiling = [r for r in results if not r.error and r.registers >= MAX_REGISTERS and r.case.maxnreg is None]
    if at_ceiling:
        capped = run_checks([replace(r.case, maxnreg=cap) for r in at_ceiling], jobs)
        for r, c in zip(at_ceiling, capped):
            r.capped_spill, r.capped_at = (CAP_FAILED if c.error else c.local + c.stack), cap
    return results


def run_checks(todo: list[Case] | None = None, jobs: int | None = None) -> list[Result]:
    """Compile ``todo`` (default: ``cases()``) and return the results in the same order, with the headroom of
    those at the register ceiling (``check_headroom``).

    In a process whose kernels are interpreter objects, the work runs in a child Python without TRITON_INTERPRET.
    ``jobs`` compiles in that many processes (default: the CPU count, at most 8).
    """
    from fastkto.kernels import fused_logprob as fl

    todo = cases() if todo is None else list(todo)
    jobs = jobs or min(os.cpu_count() or 1, 8)
    if not fl.INTERPRET:
        return check_headroom(_compile_many(todo, jobs), jobs)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        src.write_text(json.dumps([asdict(c) for c in todo]))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # the child imports this very fastkto (installed or not: the folder that holds the package, src/ in a
        # checkout) and this very tools package (the repository root)
        package_root = str(Path(fl.__file__).resolve().parents[2])
        repo_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, repo_root, env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "tools.compile_check", "--cases", str(src), "--json", str(out),
               "--jobs", str(jobs), "--quiet"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"the compile-check child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return _load(out)


def _case_from_dict(d: dict) -> Case:
    d = dict(d, switches=tuple(tuple(s) for s in d["switches"]))
    if d.get("config") is not None:
        d["config"] = tuple(d["config"])
    return Case(**d)


def _load(path: Path) -> list[Result]:
    out = []
    for item in json.loads(path.read_text()):
        out.append(Result(**dict(item, case=_case_from_dict(item["case"]))))
    return out


def _parse_config(text: str) -> tuple[str, tuple[int, ...]]:
    """"dz/16=128,128,64,8,3" -> ("dz/16", (128, 128, 64, 8, 3))."""
    try:
        key, shape = text.split("=")
        kernel, width = key.split("/")
        values = tuple(int(v) for v in shape.split(","))
    except ValueError:
        values, kernel, width = (), "", ""
    if kernel not in KERNELS or width not in ("16", "32") or len(values) not in (5, 6):
        raise argparse.ArgumentTypeError(
            f"--config expects KERNEL/WIDTH=BLOCK_N,BLOCK_V,BLOCK_D,WARPS,STAGES[,MAXNREG] with KERNEL in "
            f"{sorted(KERNELS)} and WIDTH 16 or 32, got {text!r}")
    return f"{kernel}/{width}", values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write the raw results here (JSON)")
    parser.add_argument("--jobs", type=int, default=None, help="compile in this many processes (default: CPUs, <= 8)")
    parser.add_argument("--exhaustive", action="store_true", help="every switch combination for fp16 too")
    parser.add_argument("--stats", action="store_true",
                        help="the token-statistics variants (stats_cases) instead of the plain kernels' matrix")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="keep the cases whose label (e.g. dz-bf16-sm90-bias+softcap) contains TEXT; repeatable")
    parser.add_argument("--config", action="append", default=[], type=_parse_config,
                        metavar="K/W=N,V,D,WARPS,STAGES[,MAXNREG]",
                        help="compile kernel K for width W (16 or 32 bits) with this tile shape instead; repeatable")
    parser.add_argument("--maxnreg", type=int, default=None, help="cap the registers per thread")
    parser.add_argument("--cases", type=Path, help=argparse.SUPPRESS)  # JSON list of Cases (run_checks' child)
    parser.add_argument("--quiet", action="store_true", help="print only failures")
    args = parser.parse_args(argv)

    if args.cases:
        todo = [_case_from_dict(d) for d in json.loads(args.cases.read_text())]
    else:
        configs = dict(args.config)
        todo = [replace(c, config=configs.get(f"{c.kernel}/{DTYPES[c.dtype][1]}"), maxnreg=args.maxnreg)
                for c in (stats_cases if args.stats else cases)(args.exhaustive)
                if not args.only or any(t in c.label for t in args.only)]
    start = time.perf_counter()
    results = run_checks(todo, args.jobs)
    seconds = time.perf_counter() - start
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if args.out:
        shown, skip = [], False  # the command that made the report, less the flags that do not change it
        for arg in argv if argv is not None else sys.argv[1:]:
            if not skip and arg not in ("--quiet", "--jobs") and not arg.startswith("--jobs="):
                shown.append(arg)
            skip = arg == "--jobs"
        command = " ".join(["python -m tools.compile_check", *shown])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(_report(results, command, seconds))
    failures = [(r.case.label, p) for r in results for p in problems(r)]
    if not args.quiet:
        print(format_table(results))
        print(f"\n{len(results)} compilations in {seconds:.1f} s, {len(failures)} problems")
    for label, problem in failures:
        print(f"FAIL {label}: {problem}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
