"""Triton kernels for per-token log-probabilities that never build the logits.

Same contract, names and per-tile math as ``torch_chunked.py`` (read its docstring for the formulas):

    forward   _logprob_fwd_kernel   grid (token tiles x vocabulary splits). Each program walks its vocabulary
                                    columns tile by tile: logits tile = tl.dot over D, folded into a running max m,
                                    a sum of exp(z - m) and the target logit; the tile stays on chip. Splits (for
                                    occupancy when tokens are few, and so that the resident programs' H tiles stay
                                    in L2 when they are many) are merged in PyTorch in a fixed order.
    backward  _logprob_dz_kernel    the tile maker of the shared backward loop (``tiled.py``): for one
                                    (token chunk x vocabulary chunk) tile of the loop, recompute the logits on
                                    chip in fp32 (bias, soft-cap, temperature) and write dz = g (onehot - softmax)
                                    with the chain rule, rounded to the input dtype, into the loop's workspace.
                                    The loop then accumulates dH += dz @ W and dW += dz.T @ H as cuBLAS GEMMs on
                                    tensor cores with fp32 accumulation.

    backward, one tile:  H_n, W_v --[_logprob_dz_kernel: logits on chip, exp, chain rule]--> dz (n x v, bf16)
                         dz @ W_v  --cuBLAS, fp32 accumulate--> dH[n]      dz.T @ H_n --cuBLAS--> dW_v

Determinism: the forward's every statistic has one owner program and the splits merge in a fixed order; the
backward's tiles run in a fixed order and every accumulation is a plain GEMM (no atomics, no locks, no autotuning
that could pick another tile shape), so results are bitwise reproducible on a device. The logits are recomputed
once: 8 N D V flops for forward and backward.

Interpreter (TRITON_INTERPRET=1): it treats bf16 / fp16 as raw integers, so loaded tiles are upcast to fp32
(constexpr UPCAST) and the kernels run in fp32 there; on a GPU the dots run on tensor cores in the input dtype
with fp32 accumulation. fp32 inputs use IEEE dots unless torch's fp32 matmul precision (legacy or new API)
allows tf32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tiled
from .tiled import TileMaker, default_workspace_bytes

__all__ = ["logprob_fwd", "logprob_bwd", "kernel_backward_loop", "make_dz", "TILE_MAKER", "INTERPRET", "KernelConfig",
           "gpu_configs", "select_config", "launch_meta"]


def _interpreting() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton reads the variable directly
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET = _interpreting()


@triton.jit
def _tile_logits(
    H, W, B, rows, n_mask, offs_v, v_mask, D, stride_h, stride_w, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # z = transform(H[rows] @ W[offs_v].T + b): a (BLOCK_N, BLOCK_V) fp32 tile, and tanh(a / c) for the backward
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_ptrs = H + rows[:, None] * stride_h
    w_ptrs = W + offs_v.to(tl.int64)[None, :] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_ptrs + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_d[:, None], mask=d_mask[:, None] & v_mask[None, :], other=0.0)
        if UPCAST:
            # the interpreter's tl.dot is a BLAS call whose rounding depends on an element's row and column within
            # the tile; a broadcast product summed over D in order rounds every element alike, as a GPU's MMA
            # does, so that interpreted results are as batch-invariant as compiled ones
            acc += tl.sum(h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
    return transform(acc, B, offs_v, v_mask, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def transform(acc, B, offs_v, v_mask, softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # raw logits a (fp32 tile) -> z = c tanh((a + b) / c) / T, and t = tanh((a + b) / c) for the backward
    if HAS_BIAS:
        acc += tl.load(B + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1: libdevice's tanh is not portable across Triton versions and the interpreter
        t = 2.0 * tl.sigmoid(acc * (2.0 / softcap)) - 1.0
        acc = softcap * t
    else:
        t = acc
    return acc * inv_temp, t


@triton.jit
def _tile_dlogits(z, t, lse, g, g_ent, ent, labels, offs_v, n_mask, v_mask, inv_temp, HAS_SOFTCAP: tl.constexpr,
                  ENT_GRAD: tl.constexpr):
    # d(g log p(y) + g_H H) / da = (g (onehot - p) - g_H p (log p + H)) / T (1 - t^2), p = exp(z - lse) (with
    # ENT_GRAD; H the entropy, log p + H = z - E_p[z]); zero outside the valid rows and columns so that padding rows
    # (whose exp could overflow) never reach the gradient products
    logp = z - lse[:, None]
    p = tl.exp(logp)
    onehot = (offs_v[None, :] == labels[:, None]).to(tl.float32)
    if ENT_GRAD:
        dz = (g[:, None] * (onehot - p) - g_ent[:, None] * p * (logp + ent[:, None])) * inv_temp
    else:
        dz = g[:, None] * (onehot - p) * inv_temp
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    return tl.where(n_mask[:, None] & v_mask[None, :], dz, 0.0)


@triton.jit
def fold(z, offs_v, v_mask, v0, labels, m_i, s_i, t_i, a_i, q_i, u_i, r_i, STATS: tl.constexpr):
    # fold one (BLOCK_N, BLOCK_V) logits tile into the rows' running statistics (``stats.py``): max m, sum exp(z - m)
    # s, target logit t; STATS 1: a = sum exp(z - m) (z - m); STATS 2: q = sum exp(2 (z - m)), u = sum z and the
    # first arg-max r (a float column index). ``v0``: the tile's first column as a row of the weight (shard).
    if STATS == 0:
        z = tl.where(v_mask[None, :], z, float("-inf"))
    else:
        # a finite stand-in for -inf (exp gives 0 all the same), so that exp(z - m) (z - m) is 0, not NaN
        z = tl.where(v_mask[None, :], z, -3.0e38)
    hit = (offs_v[None, :] == labels[:, None]) & v_mask[None, :]
    t_i += tl.sum(tl.where(hit, z, 0.0), axis=1)
    if STATS >= 2:
        # the max with the lowest column holding it (one reduction); a later tile takes over only with a strictly
        # larger max, so r is torch.argmax's first maximum
        tile_max, first = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        r_i = tl.where(tile_max > m_i, (v0 + first).to(tl.float32), r_i)
        u_i += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
    else:
        tile_max = tl.max(z, axis=1)
    m_new = tl.maximum(m_i, tile_max)
    alpha = tl.exp(m_i - m_new)
    if STATS >= 1:
        zs = z - m_new[:, None]
        e = tl.exp(zs)  # 0 in the masked columns
        # a at the new max: alpha (a + (m_old - m_new) s); the shift is 0 before the first tile (s = 0)
        a_i = alpha * (a_i + tl.where(s_i > 0, m_i - m_new, 0.0) * s_i) + tl.sum(e * zs, axis=1)
        if STATS >= 2:
            q_i = q_i * (alpha * alpha) + tl.sum(e * e, axis=1)
    else:
        e = tl.exp(z - m_new[:, None])  # 0 in the masked columns
    s_i = s_i * alpha + tl.sum(e, axis=1)
    return m_new, s_i, t_i, a_i, q_i, u_i, r_i


@triton.jit
def _token_tile(ROWS, LABELS, n0, M, HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    if HAS_ROWS:
        rows = tl.load(ROWS + offs_n, mask=n_mask, other=0).to(tl.int64)
    else:
        rows = offs_n.to(tl.int64)
    labels = tl.load(LABELS + offs_n, mask=n_mask, other=-1).to(tl.int32)
    return offs_n, n_mask, rows, labels


@triton.jit
def _logprob_fwd_kernel(
    H, W, B, ROWS, LABELS, MAX_OUT, SUM_OUT, TGT_OUT, STAT_OUT,
    M, V, D, stride_h, stride_w, cols_per_split, stat_stride, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, STATS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # splits vary fastest: the programs on the GPU at one time cover few token tiles, whose H tiles (re-read for
    # every vocabulary tile) then stay in L2, and each W tile is read by all of them at about the same time.
    # STATS (``stats.py``): 0 the log-sum-exp and target only; 1 also a = sum exp(z - m) (z - m) (entropy);
    # 2 also q = sum exp(2 (z - m)), u = sum z and the first arg-max r. Separate compilations, so the plain
    # kernel keeps its registers.
    n_splits = tl.cdiv(V, cols_per_split)
    pid_n = tl.program_id(0) // n_splits
    pid_s = tl.program_id(0) % n_splits
    offs_n, n_mask, rows, labels = _token_tile(ROWS, LABELS, pid_n * BLOCK_N, M, HAS_ROWS, BLOCK_N)
    m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_N,), tl.float32)
    t_i = tl.zeros((BLOCK_N,), tl.float32)
    # the statistics' sums exist at every level (unused ones are compiled away), so that ``fold`` has one signature
    a_i = tl.zeros((BLOCK_N,), tl.float32)
    q_i = tl.zeros((BLOCK_N,), tl.float32)
    u_i = tl.zeros((BLOCK_N,), tl.float32)
    r_i = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z, t = _tile_logits(H, W, B, rows, n_mask, offs_v, v_mask, D, stride_h, stride_w, softcap, inv_temp,
                            HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        m_i, s_i, t_i, a_i, q_i, u_i, r_i = fold(z, offs_v, v_mask, v0, labels, m_i, s_i, t_i, a_i, q_i, u_i, r_i,
                                                 STATS)
    out = pid_s.to(tl.int64) * M + offs_n
    tl.store(MAX_OUT + out, m_i, mask=n_mask)
    tl.store(SUM_OUT + out, s_i, mask=n_mask)
    tl.store(TGT_OUT + out, t_i, mask=n_mask)
    if STATS >= 1:
        tl.store(STAT_OUT + out, a_i, mask=n_mask)
    if STATS >= 2:
        tl.store(STAT_OUT + stat_stride + out, q_i, mask=n_mask)
        tl.store(STAT_OUT + 2 * stat_stride + out, u_i, mask=n_mask)
        tl.store(STAT_OUT + 3 * stat_stride + out, r_i, mask=n_mask)


@triton.jit
def _logprob_dz_kernel(
    H, W, B, LABELS, LSE, GRAD, GRAD_ENT, ENT, DZ,
    M, V, D, stride_h, stride_w, stride_dz, v_offset, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ENT_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # One (BLOCK_N, BLOCK_V) piece of a backward tile: recompute the logits on chip, write dz in DZ's dtype.
    # Programs run in groups of GROUP_N token tiles that sweep the vocabulary tiles together, so the programs on
    # the GPU at one time share their W (and H) tiles in L2.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(M, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_v = (pid % per_group) // group_n
    offs_n, n_mask, rows, labels = _token_tile(LABELS, LABELS, pid_n * BLOCK_N, M, False, BLOCK_N)
    lse = tl.load(LSE + offs_n, mask=n_mask, other=0.0)
    g = tl.load(GRAD + offs_n, mask=n_mask, other=0.0)
    if ENT_GRAD:  # the entropy's upstream gradient and the entropy itself (from the forward)
        g_ent = tl.load(GRAD_ENT + offs_n, mask=n_mask, other=0.0)
        ent = tl.load(ENT + offs_n, mask=n_mask, other=0.0)
    else:
        g_ent = g
        ent = g
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    z, t = _tile_logits(H, W, B, rows, n_mask, offs_v, v_mask, D, stride_h, stride_w, softcap, inv_temp,
                        HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    # labels are rows of the whole weight (shard); this chunk starts at row v_offset
    dz = _tile_dlogits(z, t, lse, g, g_ent, ent, labels - v_offset, offs_v, n_mask, v_mask, inv_temp, HAS_SOFTCAP,
                       ENT_GRAD)
    store_rounded(DZ + rows[:, None] * stride_dz + offs_v[None, :], dz, n_mask[:, None] & v_mask[None, :], UPCAST)


@triton.jit
def store_rounded(ptrs, x, mask, UPCAST: tl.constexpr):
    # store an fp32 tile in the pointers' dtype, rounded to nearest even
    if UPCAST:
        if ptrs.dtype.element_ty == tl.bfloat16:
            # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even): round here as the GPU does,
            # so that interpreted results carry the GPU's rounding error, not twice it
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration. No autotuning: a fixed tile shape per (kernel, dtype) keeps results bitwise reproducible and
# lets the compile checks (tests/test_compile.py) cover every configuration the dispatch can pick.


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    # a register cap for ptxas (None: its own choice, up to 255): the fp32 statistics forward's (below) and the GPU
    # check's sweep rows
    maxnreg: int | None = None


# 16-bit inputs: 128-wide tiles feed Hopper's wgmma (64-row warpgroup instructions) and Ampere's mma.sync; fp32:
# smaller tiles, since each operand tile takes twice the shared memory and IEEE fp32 dots use no tensor cores.
# fp32 uses 8 warps and 16-wide D chunks: IEEE fp32 dots are FMA loops that hold both operand chunks in registers,
# and with 4 warps and 32-wide chunks ptxas spilled (stack frames of 8 B to 4 KiB on sm_80 and sm_90, found by
# tools/compile_check.py); these shapes compile without spills for IEEE and tf32 (wgmma on sm_90).
# The dz kernel runs the forward's main loop with a store for an epilogue, so it takes the forward's shapes.
# The 16-bit forward pipelines 4 stages: on the H200 it was 4.7 / 4.8 / 1.8 % faster than 3 stages at the three
# reference shapes (benchmarks/results/h200/run3), the best or within 0.3 % of the best of 6 configurations; the dz
# kernel's 3 stages were within 3 % of its best everywhere, so it keeps the forward's old shape.
_GPU_CONFIGS = {
    ("fwd", "16"): KernelConfig(128, 128, 64, 8, 4),
    ("fwd", "32"): KernelConfig(64, 64, 16, 8, 3),
    ("dz", "16"): KernelConfig(128, 128, 64, 8, 3),
    ("dz", "32"): KernelConfig(64, 64, 16, 8, 3),
}
# The token-statistics variants (forward STATS 1 / 2, dz with ENT_GRAD) hold more per-tile state (exp(z - m) beside
# z, the arg-max's indices, the entropy term): at the plain shapes ptxas spilled them (forward STATS 2: 16-216 B
# stack frames on sm_80 and sm_90, at 255 registers; dz ENT_GRAD with a soft-cap: 24 B on sm_80; found by
# ``compile_check --stats``). Half-width vocabulary tiles halve the fp32 tile each thread holds; the split
# columns stay multiples of the plain tile, so the splits are the same.
# The fp32 forward's 128-register cap raises ptxas' budget rather than lowering it: left to itself, ptxas (Triton
# 3.6's and 3.9's) aimed at 3 blocks per SM, used 80 registers and spilled 8-16 B in eight IEEE variants; capped at
# 128 (2 blocks per SM) it keeps everything in 104-128 registers.
_STATS_CONFIGS = {
    ("fwd", "16"): KernelConfig(128, 64, 64, 8, 3),
    ("fwd", "32"): KernelConfig(64, 32, 16, 8, 3, 128),
    ("dz", "16"): KernelConfig(128, 64, 64, 8, 3),
    ("dz", "32"): KernelConfig(64, 32, 16, 8, 3),
}
# Small tiles under the interpreter: tests then cover many tiles and ragged edges on small shapes. 16 is the
# smallest shape tl.dot accepts on a GPU; keep it so the interpreter runs what a GPU would compile.
_INTERPRET_CONFIG = KernelConfig(16, 32, 16, 4, 1)
# token tiles per program group of the dz kernel (L2 reuse, as in Triton's matmul tutorial)
_DZ_GROUP = 8


def gpu_configs() -> dict[tuple[str, str], KernelConfig]:
    """Every (kernel, dtype width) -> configuration the GPU dispatch can choose; the compile checks read this."""
    return dict(_GPU_CONFIGS)


def stats_configs() -> dict[tuple[str, str], KernelConfig]:
    """The configurations of the token-statistics variants (``_STATS_CONFIGS``); the compile checks read this."""
    return dict(_STATS_CONFIGS)


def select_config(kernel: str, dtype: torch.dtype, stats: bool = False) -> KernelConfig:
    """The launch configuration of ``kernel`` for ``dtype``; ``stats``: a token-statistics variant."""
    if INTERPRET:
        return _INTERPRET_CONFIG
    return (_STATS_CONFIGS if stats else _GPU_CONFIGS)[(kernel, "32" if dtype == torch.float32 else "16")]


def fp32_matmul_allows_tf32() -> bool:
    """Whether torch's fp32 matmul setting allows tf32, read through whichever API the user set.

    torch has two: the legacy ``torch.set_float32_matmul_precision`` ("highest" = IEEE) and, since 2.9,
    ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" / "tf32", "none" = inherit from
    ``torch.backends.fp32_precision``). Once the new one is set, the legacy getter raises ("mix of the legacy and
    new APIs"), so the new one is read then (its getter resolves the inheritance)."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        pass
    matmul = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    value = getattr(matmul, "fp32_precision", None)
    if value in (None, "none"):
        value = getattr(torch.backends, "fp32_precision", "ieee")
    return value == "tf32"


def _precision(dtype: torch.dtype) -> str:
    if INTERPRET or dtype != torch.float32:
        return "ieee"  # ignored by tl.dot for 16-bit inputs
    return "tf32" if fp32_matmul_allows_tf32() else "ieee"


def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_columns(vocab: int, splits: int, block_v: int) -> int:
    """Vocabulary columns per split, a multiple of the tile width; every split gets at least one column."""
    return triton.cdiv(triton.cdiv(vocab, max(splits, 1)), block_v) * block_v


# Vocabulary splits of the forward: a function of V (and the tile width) only, never of the token count or the
# SM count, so that a token's statistics merge the same partial sums in the same order whatever else is in the
# call (batch invariance), on any GPU. 16 splits keep the waves full from a thousand tokens up (N = 8192 with
# 128-row tiles: 1024 programs, 7.8 waves on 132 SMs, 97 % fill; the old N- and SM-dependent rule gave 81 %) while
# the 132 programs resident at one time span about 8 token tiles, which share each W tile in L2.
_VOCAB_SPLITS = 16


def vocab_splits(vocab: int, block_v: int) -> int:
    """The forward's vocabulary splits: ``_VOCAB_SPLITS``, fewer when V has fewer than 4 tiles per split."""
    return max(1, min(_VOCAB_SPLITS, triton.cdiv(vocab, 4 * block_v)))


def launch_meta(kernel, dtype, bias, rows, softcap, temperature, cfg=None, stats=0, ent_grad=False):
    """(constexprs and launch options, softcap argument, 1 / temperature) of a launch, as the dispatch makes it
    (``tools/compile_check.py`` calls this too, so that it compiles what is launched). ``stats``: the forward's
    statistics level (``stats.py``); ``ent_grad``: the dz kernel's entropy-gradient term."""
    cfg = cfg or select_config(kernel, dtype, stats=bool(stats) or bool(ent_grad))
    meta = dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        UPCAST=INTERPRET,
        PRECISION=_precision(dtype),
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_V=cfg.BLOCK_V,
        BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if cfg.maxnreg is not None:
        meta["maxnreg"] = cfg.maxnreg
    if kernel == "fwd":
        meta["HAS_ROWS"] = rows is not None
        meta["STATS"] = int(stats)
    else:
        meta["GROUP_N"] = _DZ_GROUP
        meta["ENT_GRAD"] = bool(ent_grad)
    return meta, (float(softcap) if softcap is not None else 1.0), 1.0 / float(temperature)


def logprob_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    temperature: float = 1.0,
    workspace_bytes: int | None = None,
    splits: int | None = None,
    stats: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Triton version of ``torch_chunked.logprob_fwd``: same arguments and partial statistics (row_max, sum_exp,
    target_logit, and with ``stats`` > 0 the extra partials of ``stats.py``).

    The logits tiles never leave the chip; the only buffers are the vocabulary splits' statistics, (3 + extra) x
    splits x rows floats; when that exceeds ``workspace_bytes`` the tokens are launched in groups (a token's
    result does not depend on its group). ``splits`` forces the number of splits (tests); by default it depends
    on V only (``vocab_splits``). Hidden or weight rows that are not unit-stride along D are copied once.
    """
    from . import stats as st

    m_tokens = labels.shape[0]
    vocab, dim = weight.shape
    dev = hidden.device
    k = st.n_partials(stats)
    if stats >= 2 and vocab >= st.MAX_ARG_VOCAB:
        raise ValueError(f"token statistics need a vocabulary (shard) below {st.MAX_ARG_VOCAB} rows, got {vocab}")
    if m_tokens == 0 or vocab == 0:
        return st.empty(m_tokens, stats, dev)
    # the kernel reads rows with unit stride along D (64-bit offsets for the rest) and vectors with unit stride
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows = None if rows is None else rows.contiguous()
    labels = labels.contiguous()
    budget = default_workspace_bytes(dev) if workspace_bytes is None else workspace_bytes
    cfg = select_config("fwd", hidden.dtype, stats=stats > 0)
    # the splits follow the plain configuration's tile width at every level (a multiple of the stats tiles')
    plain = select_config("fwd", hidden.dtype)
    cols = _split_columns(vocab, vocab_splits(vocab, plain.BLOCK_V) if splits is None else splits, plain.BLOCK_V)
    n_splits = triton.cdiv(vocab, cols)
    group = _token_group(m_tokens, n_splits, k, budget, max(cfg.BLOCK_N, plain.BLOCK_N))
    meta, softcap_arg, inv_temp = launch_meta("fwd", hidden.dtype, bias, rows, softcap, temperature, stats=stats)
    out = [torch.empty(m_tokens, device=dev, dtype=torch.float32) for _ in range(k)]
    for r0 in range(0, m_tokens, group):
        r1 = min(r0 + group, m_tokens)
        m = r1 - r0
        part = torch.empty(k, n_splits, m, device=dev, dtype=torch.float32)
        h = hidden if rows is not None else hidden[r0:r1]
        n_tiles = triton.cdiv(m, cfg.BLOCK_N)
        # any valid pointer stands in for a tensor that a constexpr switch leaves unread
        _logprob_fwd_kernel[(n_tiles * n_splits,)](
            h, weight, h if bias is None else bias, labels[r0:r1] if rows is None else rows[r0:r1],
            labels[r0:r1], part[0], part[1], part[2], part[3] if k > 3 else part[0],
            m, vocab, dim, h.stride(0), weight.stride(0), cols, n_splits * m, softcap_arg, inv_temp, **meta,
        )
        if n_splits == 1:
            merged = tuple(part[:, 0])
        else:  # merge the splits' statistics in a fixed order, element-wise per token: deterministic, batch-invariant
            merged = st.merge([tuple(part[:, i]) for i in range(n_splits)])
        if group >= m_tokens:
            return tuple(merged)
        for dst, src in zip(out, merged):
            dst[r0:r1] = src
    return tuple(out)


def _per_token_bytes(n_splits: int, k: int) -> int:
    """Forward buffer bytes per token: k partials per split and, with several splits, the merge's temporaries (a
    running total per partial, the new max, the scale and the shift)."""
    return 4 * (k * n_splits + ((k + 3) if n_splits > 1 else 0))


def _token_group(m_tokens: int, n_splits: int, k: int, budget: int, block_n: int) -> int:
    """Tokens per forward launch: all of them when their buffers fit ``budget``, else a multiple of the tile."""
    per_token = _per_token_bytes(n_splits, k)
    if per_token * m_tokens <= budget:
        return m_tokens
    return max(block_n, budget // per_token // block_n * block_n)


def forward_buffer_bytes(m_tokens: int, vocab: int, dtype: torch.dtype, budget: int, stats: int = 0,
                         gpu: bool = False) -> int:
    """Bytes of the buffers one forward call allocates (the memory simulation's count): the splits' partials and
    the merge's temporaries for the tokens of one launch group. ``gpu``: the GPU's tile shapes (not the
    interpreter's)."""
    from . import stats as st

    cfg = _GPU_CONFIGS[("fwd", "32" if dtype == torch.float32 else "16")] if gpu else select_config("fwd", dtype)
    k = st.n_partials(stats)
    n_splits = triton.cdiv(vocab, _split_columns(vocab, vocab_splits(vocab, cfg.BLOCK_V), cfg.BLOCK_V))
    group = _token_group(m_tokens, n_splits, k, budget, cfg.BLOCK_N)
    return _per_token_bytes(n_splits, k) * min(group, m_tokens)


def make_dz(h, w, b, labels, v0, lse, g, softcap, inv_temp, out, ws, ent=None) -> None:
    """The Triton tile maker: dz of tokens h (n, D) against vocabulary rows w (v, D) into ``out`` (n, v), rounded to
    out's dtype; one launch over (BLOCK_N, BLOCK_V) pieces (see ``tiled.TileMaker`` for the arguments; ``ent``:
    (entropy's upstream gradient, entropy), each (n,) float32, or None)."""
    n, v = out.shape
    meta, softcap_arg, _ = launch_meta("dz", h.dtype, b, None, softcap, 1.0, ent_grad=ent is not None)
    grid = (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)
    g_ent, entropy = (g, g) if ent is None else ent
    _logprob_dz_kernel[grid](
        h, w, h if b is None else b, labels, lse, g, g_ent, entropy, out,
        n, v, h.shape[1], h.stride(0), w.stride(0), out.stride(0), v0, softcap_arg, inv_temp, **meta,
    )


def _scratch(n, v, gemm_dtype, softcap, backward, extra=False):
    return {}  # the logits stay on chip


# dz is rounded to the input dtype, as the GPU's tensor-core GEMMs take it (also when the interpreter multiplies
# fp32 copies: the rounding is the GPU's, only the products' order differs)
# GPU tile sides are multiples of the 16-bit dz kernel's blocks (the fp32 blocks divide them)
GPU_ALIGN = (_GPU_CONFIGS[("dz", "16")].BLOCK_N, _GPU_CONFIGS[("dz", "16")].BLOCK_V)
TILE_MAKER = TileMaker(make_dz=make_dz, dz_dtype=lambda input_dtype, gemm_dtype: input_dtype, scratch=_scratch,
                       align=(_INTERPRET_CONFIG.BLOCK_N, _INTERPRET_CONFIG.BLOCK_V) if INTERPRET else GPU_ALIGN)


def logprob_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    softcap: float | None = None,
    temperature: float = 1.0,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    workspace_bytes: int | None = None,
    tile: tuple[int, int] | None = None,
    on_step=None,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton version of ``torch_chunked.logprob_bwd``: the shared tile loop (``tiled.backward_loop``) with the fused
    dz kernel; same arguments and (grad_hidden fp32 compact, grad_weight, grad_bias). ``tile`` forces the tile
    shape (tests); ``on_step`` marks the steps (``benchmarks.roofline``)."""
    return kernel_backward_loop(
        TILE_MAKER, hidden, weight, bias, rows, labels, lse, grad, softcap=softcap, temperature=temperature,
        need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, workspace_bytes=workspace_bytes,
        tile=tile, on_step=on_step, grad_entropy=grad_entropy, entropy=entropy)


def kernel_backward_loop(maker, hidden, weight, bias, rows, labels, lse, grad, *, grad_entropy=None, entropy=None,
                         **opts):
    """``tiled.backward_loop`` with ``maker``'s Triton kernel reading the per-token vectors and the bias: they are
    made unit-stride (and fp32) here; the loop gives the kernel unit-stride rows. ``opts``: the loop's keywords."""
    def vector(t):
        return None if t is None else t.float().contiguous()

    return tiled.backward_loop(
        maker, hidden, weight, None if bias is None else bias.contiguous(), rows, labels.contiguous(), vector(lse),
        vector(grad), grad_entropy=vector(grad_entropy), entropy=vector(entropy), **opts)
