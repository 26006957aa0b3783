"""Triton kernels for per-token log-probabilities that never build the logits.

Same contract, names and per-tile math as ``torch_chunked.py`` (read its docstring for the formulas):

    forward   _logprob_fwd_kernel     grid (token tiles, vocabulary splits). Each program walks its vocabulary
                                      columns tile by tile: logits tile = tl.dot over D, folded into a running
                                      max m, a sum of exp(z - m) and the target logit; the tile stays on chip.
                                      Splits (for occupancy when tokens are few) are merged in PyTorch.
    backward  _logprob_bwd_dh_kernel  grid (token tiles, vocabulary splits): recompute each logits tile, form
                                      dz = g (onehot - softmax) with the temperature / soft-cap chain rule, and
                                      add dz @ W_tile into this program's own rows of an fp32 dH buffer.
              _logprob_bwd_dw_kernel  persistent grid over vocabulary tiles: recompute each tile for every token
                                      tile, add dz.T @ H_tile into this program's own rows of an fp32 buffer,
                                      write dW (and db) in the weight's dtype after the last token tile.

Determinism: every gradient element is accumulated by exactly one program in a fixed order (no atomics, no
locks, no autotuning that could pick another tile shape), so results are bitwise reproducible on a device.
The price is that the backward recomputes the logits twice (once per kernel): 8 N D V flops instead of 6.

Interpreter (TRITON_INTERPRET=1): it treats bf16 / fp16 as raw integers, so loaded tiles are upcast to fp32
(constexpr UPCAST) and the kernels run in fp32 there; on a GPU the dots run on tensor cores in the input dtype
with fp32 accumulation. fp32 inputs use IEEE dots unless ``torch.get_float32_matmul_precision()`` allows tf32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["logprob_fwd", "logprob_bwd", "INTERPRET", "KernelConfig", "gpu_configs", "select_config"]


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
    w_ptrs = W + offs_v[None, :] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_ptrs + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_d[:, None], mask=d_mask[:, None] & v_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
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
def _tile_dlogits(z, t, lse, g, labels, offs_v, n_mask, v_mask, inv_temp, HAS_SOFTCAP: tl.constexpr):
    # d(g log p(y)) / da = g (onehot - exp(z - lse)) / T (1 - t^2); zero outside the valid rows and columns so that
    # padding rows (whose exp could overflow) never reach the gradient products
    p = tl.exp(z - lse[:, None])
    onehot = (offs_v[None, :] == labels[:, None]).to(tl.float32)
    dz = g[:, None] * (onehot - p) * inv_temp
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    return tl.where(n_mask[:, None] & v_mask[None, :], dz, 0.0)


@triton.jit
def _token_tile(ROWS, LABELS, n0, M, HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    if HAS_ROWS:
        rows = tl.load(ROWS + offs_n, mask=n_mask, other=0).to(tl.int64)
    else:
        rows = offs_n.to(tl.int64)
    labels = tl.load(LABELS + offs_n, mask=n_mask, other=-1).to(tl.int64)
    return offs_n, n_mask, rows, labels


@triton.jit
def _logprob_fwd_kernel(
    H, W, B, ROWS, LABELS, MAX_OUT, SUM_OUT, TGT_OUT,
    M, V, D, stride_h, stride_w, cols_per_split, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n, n_mask, rows, labels = _token_tile(ROWS, LABELS, pid_n * BLOCK_N, M, HAS_ROWS, BLOCK_N)
    m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_N,), tl.float32)
    t_i = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < v_end
        z, t = _tile_logits(H, W, B, rows, n_mask, offs_v, v_mask, D, stride_h, stride_w, softcap, inv_temp,
                            HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        hit = (offs_v[None, :] == labels[:, None]) & v_mask[None, :]
        t_i += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    out = pid_s.to(tl.int64) * M + offs_n
    tl.store(MAX_OUT + out, m_i, mask=n_mask)
    tl.store(SUM_OUT + out, s_i, mask=n_mask)
    tl.store(TGT_OUT + out, t_i, mask=n_mask)


@triton.jit
def _logprob_bwd_dh_kernel(
    H, W, B, ROWS, LABELS, LSE, GRAD, DH,
    M, V, D, stride_h, stride_w, cols_per_split, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n, n_mask, rows, labels = _token_tile(ROWS, LABELS, pid_n * BLOCK_N, M, HAS_ROWS, BLOCK_N)
    lse = tl.load(LSE + offs_n, mask=n_mask, other=0.0)
    g = tl.load(GRAD + offs_n, mask=n_mask, other=0.0)
    # this program owns rows offs_n of split pid_s of the fp32 buffer: no other program touches them
    dh_ptrs = DH + (pid_s.to(tl.int64) * M + offs_n)[:, None] * D
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < v_end
        z, t = _tile_logits(H, W, B, rows, n_mask, offs_v, v_mask, D, stride_h, stride_w, softcap, inv_temp,
                            HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        dz = _tile_dlogits(z, t, lse, g, labels, offs_v, n_mask, v_mask, inv_temp, HAS_SOFTCAP)
        if not UPCAST:
            dz = dz.to(W.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            w = tl.load(W + offs_v[:, None] * stride_w + offs_d[None, :],
                        mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            mask = n_mask[:, None] & d_mask[None, :]
            # the first tile of the split starts the sum, so the buffer needs no zero fill (a scalar in the mask
            # would be simpler, but the interpreter rejects a mask combined with a scalar condition)
            acc = tl.where(v0 > v_begin, tl.load(dh_ptrs + offs_d[None, :], mask=mask, other=0.0), 0.0)
            acc = tl.dot(dz, w, acc, input_precision=PRECISION)
            tl.store(dh_ptrs + offs_d[None, :], acc, mask=mask)
        # the next tile re-reads these sums; the compiler may store and load them from different threads
        tl.debug_barrier()


@triton.jit
def _logprob_bwd_dw_kernel(
    H, W, B, ROWS, LABELS, LSE, GRAD, DW, DB, ACC,
    M, V, D, stride_h, stride_w, acc_stride_prog, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ACC_IN_DW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_vtiles = tl.cdiv(V, BLOCK_V)
    for vt in range(pid, n_vtiles, tl.num_programs(0)):
        offs_v = (vt * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        dw_ptrs = DW + offs_v[:, None] * D
        if ACC_IN_DW:  # fp32 weight: the gradient itself is the accumulator
            acc_ptrs = dw_ptrs
        else:  # this program's own (BLOCK_V, D) fp32 scratch, reused for each of its vocabulary tiles
            acc_ptrs = ACC + pid.to(tl.int64) * acc_stride_prog + tl.arange(0, BLOCK_V).to(tl.int64)[:, None] * D
        db = tl.zeros((BLOCK_V,), tl.float32)
        for n0 in range(0, M, BLOCK_N):
            offs_n, n_mask, rows, labels = _token_tile(ROWS, LABELS, n0, M, HAS_ROWS, BLOCK_N)
            lse = tl.load(LSE + offs_n, mask=n_mask, other=0.0)
            g = tl.load(GRAD + offs_n, mask=n_mask, other=0.0)
            z, t = _tile_logits(H, W, B, rows, n_mask, offs_v, v_mask, D, stride_h, stride_w, softcap, inv_temp,
                                HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            dz = _tile_dlogits(z, t, lse, g, labels, offs_v, n_mask, v_mask, inv_temp, HAS_SOFTCAP)
            if NEED_BIAS:
                db += tl.sum(dz, axis=0)
            if NEED_WEIGHT:
                if UPCAST:
                    dzt = tl.trans(dz)
                else:
                    dzt = tl.trans(dz.to(W.dtype.element_ty))
                last = n0 + BLOCK_N >= M
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    d_mask = offs_d < D
                    h = tl.load(H + rows[:, None] * stride_h + offs_d[None, :],
                                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                    if UPCAST:
                        h = h.to(tl.float32)
                    mask = v_mask[:, None] & d_mask[None, :]
                    acc = tl.where(n0 > 0, tl.load(acc_ptrs + offs_d[None, :], mask=mask, other=0.0), 0.0)
                    acc = tl.dot(dzt, h, acc, input_precision=PRECISION)
                    if last:  # the finished sums go straight to dW in its dtype, from the threads that hold them
                        tl.store(dw_ptrs + offs_d[None, :], acc.to(DW.dtype.element_ty), mask=mask)
                    else:
                        tl.store(acc_ptrs + offs_d[None, :], acc, mask=mask)
                tl.debug_barrier()
        if NEED_BIAS:
            tl.store(DB + offs_v, db.to(DB.dtype.element_ty), mask=v_mask)


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


# 16-bit inputs: 128-wide tiles feed Hopper's wgmma (64-row warpgroup instructions) and Ampere's mma.sync; fp32:
# smaller tiles, since each operand tile takes twice the shared memory and IEEE fp32 dots use no tensor cores.
# fp32 uses 8 warps and 16-wide D chunks: IEEE fp32 dots are FMA loops that hold both operand chunks in registers,
# and with 4 warps and 32-wide chunks ptxas spilled (stack frames of 8 B to 4 KiB on sm_80 and sm_90, found by
# fastkto.kernels.compile_check); these shapes compile without spills for IEEE and tf32 (wgmma on sm_90).
_GPU_CONFIGS = {
    ("fwd", "16"): KernelConfig(128, 128, 64, 8, 3),
    ("fwd", "32"): KernelConfig(64, 64, 16, 8, 3),
    ("dh", "16"): KernelConfig(64, 128, 64, 8, 3),
    ("dh", "32"): KernelConfig(64, 64, 16, 8, 2),
    # 32-wide D chunks: with 64, ptxas ran out of registers on sm_90 (255 used, 8-16 B spilled) for the
    # dispatch's softcap-without-bias and bias-without-softcap variants (fastkto.kernels.compile_check)
    ("dw", "16"): KernelConfig(64, 128, 32, 8, 3),
    ("dw", "32"): KernelConfig(64, 64, 16, 8, 2),
}
# Small tiles under the interpreter: tests then cover many tiles and ragged edges on small shapes. 16 is the
# smallest shape tl.dot accepts on a GPU; keep it so the interpreter runs what a GPU would compile.
_INTERPRET_CONFIG = KernelConfig(16, 32, 16, 4, 1)


def gpu_configs() -> dict[tuple[str, str], KernelConfig]:
    """Every (kernel, dtype width) -> configuration the GPU dispatch can choose; the compile checks read this."""
    return dict(_GPU_CONFIGS)


def select_config(kernel: str, dtype: torch.dtype) -> KernelConfig:
    if INTERPRET:
        return _INTERPRET_CONFIG
    return _GPU_CONFIGS[(kernel, "32" if dtype == torch.float32 else "16")]


def _precision(dtype: torch.dtype) -> str:
    if INTERPRET or dtype != torch.float32:
        return "ieee"  # ignored by tl.dot for 16-bit inputs
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_columns(vocab: int, splits: int, block_v: int) -> int:
    """Vocabulary columns per split, a multiple of the tile width; every split gets at least one column."""
    return triton.cdiv(triton.cdiv(vocab, max(splits, 1)), block_v) * block_v


def _auto_splits(n_tiles: int, vocab: int, block_v: int, device: torch.device, max_splits: int) -> int:
    """Enough vocabulary splits to give every SM about two programs, keeping at least 4 tiles per split."""
    return max(1, min(triton.cdiv(2 * _num_sms(device), n_tiles), triton.cdiv(vocab, 4 * block_v), max_splits))


def _common(hidden, weight, bias, rows, softcap, temperature, cfg):
    return dict(
        HAS_BIAS=bias is not None,
        HAS_ROWS=rows is not None,
        HAS_SOFTCAP=softcap is not None,
        UPCAST=INTERPRET,
        PRECISION=_precision(hidden.dtype),
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_V=cfg.BLOCK_V,
        BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    ), (float(softcap) if softcap is not None else 1.0), 1.0 / float(temperature)


def _prepare(hidden, weight, bias, rows, labels):
    # the kernels read rows with unit stride along D, with 64-bit offsets for the rest
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    # any valid pointer stands in for a tensor that a constexpr switch leaves unread
    rows_arg = labels if rows is None else rows.contiguous()
    bias_arg = hidden if bias is None else bias
    return hidden, weight, bias, bias_arg, rows_arg, labels.contiguous()


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``torch_chunked.logprob_fwd``: same arguments and (row_max, sum_exp, target_logit).

    ``splits`` forces the number of vocabulary splits (tests); by default it follows the SM count.
    ``workspace_bytes`` is accepted for the shared contract; the forward's only buffers are (splits, M) floats.
    """
    m_tokens = labels.shape[0]
    vocab, dim = weight.shape
    dev = hidden.device
    if m_tokens == 0 or vocab == 0:
        return (torch.full((m_tokens,), float("-inf"), device=dev), torch.zeros(m_tokens, device=dev),
                torch.zeros(m_tokens, device=dev))
    hidden, weight, bias, bias_arg, rows_arg, labels = _prepare(hidden, weight, bias, rows, labels)
    cfg = select_config("fwd", hidden.dtype)
    n_tiles = triton.cdiv(m_tokens, cfg.BLOCK_N)
    if splits is None:
        splits = _auto_splits(n_tiles, vocab, cfg.BLOCK_V, dev, max_splits=64)
    cols = _split_columns(vocab, splits, cfg.BLOCK_V)
    n_splits = triton.cdiv(vocab, cols)
    part = torch.empty(3, n_splits, m_tokens, device=dev, dtype=torch.float32)
    meta, softcap_arg, inv_temp = _common(hidden, weight, bias, rows, softcap, temperature, cfg)
    _logprob_fwd_kernel[(n_tiles, n_splits)](
        hidden, weight, bias_arg, rows_arg, labels, part[0], part[1], part[2],
        m_tokens, vocab, dim, hidden.stride(0), weight.stride(0), cols, softcap_arg, inv_temp, **meta,
    )
    if n_splits == 1:
        return part[0, 0], part[1, 0], part[2, 0]
    # merge the splits' statistics in a fixed order: deterministic
    row_max = part[0].amax(dim=0)
    sum_exp = (part[1] * torch.exp(part[0] - row_max)).sum(dim=0)
    return row_max, sum_exp, part[2].sum(dim=0)


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
    splits: int | None = None,
    dw_programs: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton version of ``torch_chunked.logprob_bwd``: same arguments and (grad_hidden fp32 compact, grad_weight,
    grad_bias).

    ``workspace_bytes`` caps the split buffers of dH (at least one (M, D) fp32 buffer is always needed).
    ``splits`` / ``dw_programs`` force the dH vocabulary splits and the dW kernel's program count (tests).
    """
    from .torch_chunked import default_workspace_bytes

    m_tokens = labels.shape[0]
    vocab, dim = weight.shape
    dev = hidden.device
    need_bias = need_bias and bias is not None
    if m_tokens == 0 or vocab == 0:
        return (torch.zeros(m_tokens, dim, device=dev) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    hidden, weight, bias, bias_arg, rows_arg, labels = _prepare(hidden, weight, bias, rows, labels)
    lse = lse.float().contiguous()
    grad = grad.float().contiguous()
    budget = default_workspace_bytes() if workspace_bytes is None else workspace_bytes

    d_hidden = None
    if need_hidden:
        cfg = select_config("dh", hidden.dtype)
        n_tiles = triton.cdiv(m_tokens, cfg.BLOCK_N)
        if splits is None:
            # each split adds an (M, D) fp32 partial sum: as many as the workspace budget allows
            splits = _auto_splits(n_tiles, vocab, cfg.BLOCK_V, dev, max_splits=budget // (m_tokens * dim * 4))
        cols = _split_columns(vocab, splits, cfg.BLOCK_V)
        n_splits = triton.cdiv(vocab, cols)
        buf = torch.empty(n_splits, m_tokens, dim, device=dev, dtype=torch.float32)
        meta, softcap_arg, inv_temp = _common(hidden, weight, bias, rows, softcap, temperature, cfg)
        _logprob_bwd_dh_kernel[(n_tiles, n_splits)](
            hidden, weight, bias_arg, rows_arg, labels, lse, grad, buf,
            m_tokens, vocab, dim, hidden.stride(0), weight.stride(0), cols, softcap_arg, inv_temp, **meta,
        )
        d_hidden = buf[0] if n_splits == 1 else buf.sum(dim=0)

    d_weight = d_bias = None
    if need_weight or need_bias:
        cfg = select_config("dw", hidden.dtype)
        n_vtiles = triton.cdiv(vocab, cfg.BLOCK_V)
        programs = dw_programs if dw_programs is not None else min(n_vtiles, 2 * _num_sms(dev))
        programs = max(1, min(programs, n_vtiles))
        acc_in_dw = weight.dtype == torch.float32
        unused = lse  # a valid pointer for arguments a constexpr switch leaves unread
        d_weight = torch.empty(vocab, dim, device=dev, dtype=weight.dtype) if need_weight else None
        if need_weight and not acc_in_dw:
            scratch = torch.empty(programs, cfg.BLOCK_V, dim, device=dev, dtype=torch.float32)
        else:
            scratch = unused
        d_bias = torch.empty(vocab, device=dev, dtype=bias.dtype) if need_bias else None
        meta, softcap_arg, inv_temp = _common(hidden, weight, bias, rows, softcap, temperature, cfg)
        _logprob_bwd_dw_kernel[(programs,)](
            hidden, weight, bias_arg, rows_arg, labels, lse, grad,
            unused if d_weight is None else d_weight, unused if d_bias is None else d_bias, scratch,
            m_tokens, vocab, dim, hidden.stride(0), weight.stride(0), cfg.BLOCK_V * dim, softcap_arg, inv_temp,
            NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, ACC_IN_DW=acc_in_dw, **meta,
        )
    return d_hidden, d_weight, d_bias
