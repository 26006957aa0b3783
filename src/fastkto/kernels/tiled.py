"""The backward pass of both implementations: one loop over (vocabulary chunk, token chunk) tiles.

For each tile the implementation makes dz, the gradient of sum_i g_i log p_i with respect to the tile's raw
logits (``torch_chunked.py`` has the math), its own way: a fused Triton kernel on CUDA that recomputes the logits
on chip (``fused_logprob.make_dz``), PyTorch ops elsewhere (``torch_chunked.make_dz``). Everything else is shared
and written once, here:

    for each vocabulary chunk v (outer):          W_v = weight[v]                (v x D)
        for each token chunk n (inner):           H_n = hidden[rows[n]]          (n x D)
            dz = make_dz(H_n, W_v, ...)           (n x v), in the GEMM operand dtype or rounded to the input dtype
            dH[n]  (+)= dz   @ W_v                GEMM, fp32 accumulation into the (M, D) fp32 hidden gradient
            dW_v   (+)= dz.T @ H_n                GEMM, fp32 accumulation into a (v, D) fp32 chunk accumulator
                                                  (one token chunk, 16-bit GEMMs: straight into dW[v], no buffer)
            db_v   (+)= sum_rows dz               fp32
        dW[v] = dW_v                              once per vocabulary chunk, in the weight's dtype

Why this order and these sizes. The accumulators are too large to stay on chip (D is 576 to 8192), so what
matters is how often each crosses memory: dH[n] once per vocabulary chunk, dW_v once per token chunk. Vocabulary
outermost keeps dW_v in the workspace for the whole token loop, so only the (M, D) fp32 hidden gradient lives
outside the budget (a token-outer loop would need a (V, D) fp32 weight-gradient accumulator). Tiles are as large
as the budget allows, thousands of rows a side on a GPU, so each accumulator crosses HBM once per thousands of
rows (the old per-kernel accumulation did it once per 64 or 128), and the products are long GEMMs that run at the
tensor cores' rate (16-bit operands, fp32 accumulation, cuBLAS). The logits are recomputed once: 8 N D V flops
for forward + backward in all (forward 2, recompute 2, the two GEMMs 2 + 2).

Memory: every temporary of the backward (dz tile, gathered or converted operand chunks, the dW and db chunk
accumulators, GEMM scratch) is one of the named buffers of ``workspace_buffers``, sized by ``plan_tiles`` to fit
the call's ``workspace_bytes``; outside it are only the outputs, the (M, D) fp32 hidden gradient and a few floats
per token. Deterministic: the tiles run in a fixed order and every product is a plain GEMM (cuBLAS / BLAS are
bitwise reproducible on one device), so repeated runs agree bitwise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TileMaker", "CallShape", "plan_tiles", "workspace_buffers", "Workspace", "matmul_fp32",
           "fp32_gemm_support", "gemm_dtype", "backward_loop", "Tile", "tiles", "default_workspace_bytes",
           "DEFAULT_WORKSPACE_MIB"]

# Default budgets per device type. CPU: 64 MiB holds the measured-fastest cache-sized tiles with room to spare.
# CUDA: 128 MiB gives tiles of thousands of rows a side (e.g. 6144 x 6144 at D = 2048, about 4096 x 4096 at
# D = 8192 with a 16-bit weight), where cuBLAS runs at its full rate and each fp32 accumulator crosses HBM once
# per thousands of rows; larger budgets gain little (benchmarks/roofline.py), smaller ones shrink the tiles.
DEFAULT_WORKSPACE_MIB = {"cpu": 64, "cuda": 128}


def default_workspace_bytes(device: torch.device | str = "cpu") -> int:
    """The workspace budget in bytes: ``$FASTKTO_WORKSPACE_MIB`` MiB when set, else ``DEFAULT_WORKSPACE_MIB`` for
    the device type (64 MiB for devices it does not list)."""
    raw = os.environ.get("FASTKTO_WORKSPACE_MIB")
    if raw is None or raw == "":
        return DEFAULT_WORKSPACE_MIB.get(torch.device(device).type, 64) << 20
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"FASTKTO_WORKSPACE_MIB must be a positive number of MiB, got {raw!r}") from None
    if not (math.isfinite(mib) and mib > 0):
        raise ValueError(f"FASTKTO_WORKSPACE_MIB must be a positive number of MiB, got {raw!r}")
    return int(mib * (1 << 20))


# ---------------------------------------------------------------------------------------------------------------
# fp32-accumulating GEMMs


@functools.cache
def fp32_gemm_support(device_type: str) -> tuple[bool, bool]:
    """(16-bit mm with an fp32 output, addmm accumulating 16-bit products into an fp32 input) on this device type.

    ``torch.mm(a16, b16, out_dtype=torch.float32)`` exists on CUDA in recent torch; the fp32-input ``addmm`` form
    (beta = 1 into an fp32 accumulator) only in newer releases. Probed once with tiny tensors.
    """
    if device_type == "meta":
        return False, False
    a = torch.ones(2, 2, device=device_type, dtype=torch.bfloat16)
    acc = torch.zeros(2, 2, device=device_type)
    try:
        torch.mm(a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False, False
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return True, False
    return True, bool(acc[0, 0].item() == 4.0)


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the GEMM operands: the input dtype where the device multiplies it with fp32 accumulation into
    an fp32 output (tensor cores on CUDA), else float32 (fp32 copies of the 16-bit operand chunks: exact products)."""
    if dtype == torch.float32 or fp32_gemm_support(device.type)[0]:
        return dtype
    return torch.float32


def matmul_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool,
                prod: torch.Tensor | None = None) -> None:
    """out (fp32) = a @ b, or += with ``accumulate``; a and b fp32 or both 16-bit, accumulated in fp32. ``out`` in
    a and b's 16-bit dtype (no ``accumulate``): the product accumulated in fp32 and rounded once.

    ``prod``: an fp32 buffer of out's size, needed only where the device has no fp32-accumulating ``addmm`` for
    16-bit operands (the product goes there in fp32, then into ``out``).
    """
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.dtype == a.dtype:  # a 16-bit output (the direct dW write): fp32 accumulation inside, one rounding
        if accumulate:
            raise ValueError("matmul_fp32: a 16-bit output cannot accumulate (it would round every partial sum)")
        torch.mm(a, b, out=out)
    elif not accumulate:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif fp32_gemm_support(out.device.type)[1]:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out.add_(torch.mm(a, b, out_dtype=torch.float32, out=prod))


# ---------------------------------------------------------------------------------------------------------------
# Tile plan and workspace


@dataclass(frozen=True)
class TileMaker:
    """How one implementation makes a dz tile; the only part of the backward that differs between paths.

    ``make_dz(h, w, b, labels, v0, lse, g, softcap, inv_temp, out, ws)`` writes dz for tokens h (n, D) and
    vocabulary rows w (v, D), both in the GEMM dtype, into ``out`` (n, v) of ``dz_dtype``; ``labels`` are the
    tokens' labels as rows of this weight, ``v0`` the chunk's first row, b the chunk's bias or None, lse and g
    the tokens' log-sum-exp and upstream gradient (fp32).
    ``dz_dtype(input_dtype, gemm_dtype)``: where dz is rounded (the input dtype for a fused kernel, as on a GPU).
    ``scratch(n, v, gemm_dtype, softcap, backward)``: the tile buffers the maker needs besides dz (and, with
    ``backward=False``, for the PyTorch forward's logits tiles), {name: (numel, dtype)}.
    ``align``: tile sides are multiples of it when the shape allows (the kernel's block shape).
    ``cpu_tile``: on the CPU, (max tile elements, max vocabulary rows) of the measured-fastest tile, or None.
    """

    make_dz: Callable
    dz_dtype: Callable[[torch.dtype, torch.dtype], torch.dtype]
    scratch: Callable[..., dict]  # (n, v, gemm_dtype, softcap, backward[, extra])
    align: tuple[int, int] = (1, 1)
    cpu_tile: tuple[int, int] | None = None


@dataclass(frozen=True)
class CallShape:
    """What of a call decides its buffers: sizes, dtypes and switches (hashable, so plans are cached)."""

    tokens: int  # M, the scored rows
    vocab: int
    dim: int
    input_dtype: torch.dtype
    gemm_dtype: torch.dtype
    device_type: str
    gathered: bool  # hidden rows are read through ``rows`` (some tokens ignored)
    hidden_strided: bool  # hidden rows are not unit-stride along D
    weight_strided: bool
    softcap: bool
    need_weight: bool
    need_bias: bool
    fused_accumulate: bool  # the device has the fp32-accumulating 16-bit addmm
    stats: int = 0  # the forward's token statistics level (``stats.py``)
    entropy_grad: bool = False  # the backward's tiles carry the entropy's gradient


def workspace_buffers(n: int, v: int, call: CallShape, maker: TileMaker, backward: bool = True) -> dict:
    """{name: (numel, dtype)} of every temporary a tile loop with (n, v) tiles allocates (``backward=False``: the
    PyTorch forward's subset)."""
    d, g = call.dim, call.gemm_dtype
    extra = call.entropy_grad if backward else call.stats > 0
    bufs = dict(maker.scratch(n, v, g, call.softcap, backward, extra) if extra else
                maker.scratch(n, v, g, call.softcap, backward))
    if backward:
        dz = maker.dz_dtype(call.input_dtype, g)
        bufs["dz"] = (n * dz_row_stride(v, call.device_type), dz)
        if dz != g:  # rounded where a GPU rounds, multiplied as fp32 (a device without 16-bit fp32-output GEMMs)
            bufs["dz_gemm"] = (n * v, g)
    if call.gathered or call.input_dtype != g or call.hidden_strided:
        bufs["h"] = (n * d, g)
        if call.gathered and call.input_dtype != g:
            bufs["h_src"] = (n * d, call.input_dtype)
    if call.input_dtype != g or call.weight_strided:
        bufs["w"] = (v * d, g)
    if backward:
        # the fp32 (v, D) chunk accumulator, except with one token chunk where the 16-bit GEMM writes the weight
        # gradient directly (fp32 accumulation inside the GEMM, one rounding: what the cast of the chunk did)
        if call.need_weight and call.input_dtype != torch.float32 and not direct_dw(n, call):
            bufs["dw"] = (v * d, torch.float32)
        if call.need_bias:
            bufs["db_part"] = (v, torch.float32)
            if call.input_dtype != torch.float32:
                bufs["db"] = (v, torch.float32)
        if g != torch.float32 and not call.fused_accumulate:
            bufs["prod"] = (max(n, v) * d, torch.float32)
    # not a buffer: what the tile's small torch ops allocate (label offsets, masks, one-hot coefficients: a few
    # words per token row; the bias chunk as fp32), counted so that the plan leaves room for it
    bufs[VECTORS] = (n * _TILE_ROW_BYTES + v * 8, torch.uint8)
    return bufs


VECTORS = "(tile vectors)"
_TILE_ROW_BYTES = 64
# per scored token, outside any tile: row index, label, log-sum-exp, upstream gradient and the forward's statistics
PER_TOKEN_BYTES = 48


def direct_dw(n: int, call: CallShape) -> bool:
    """Whether the dW GEMM writes the weight gradient directly: one token chunk (n covers every scored token, so
    each vocabulary chunk's dW is one GEMM over all of them) and 16-bit GEMM operands (the GEMM accumulates in fp32
    and rounds once into the 16-bit gradient)."""
    return n >= call.tokens and call.gemm_dtype == call.input_dtype and call.input_dtype != torch.float32


def dz_row_stride(v: int, device_type: str) -> int:
    """The row stride of a dz tile v wide. On a GPU v rounded up to 16 elements, so that kernel stores are
    aligned and every GEMM operand row starts 16-byte aligned whatever the chunk's width; elsewhere v (contiguous
    tiles for the CPU's in-place BLAS calls)."""
    return v if device_type == "cpu" else -(-v // 16) * 16


def buffers_nbytes(bufs: dict) -> int:
    return sum(numel * dtype.itemsize for numel, dtype in bufs.values())


def _candidates(limit: int, align: int) -> list[int]:
    """Multiples of ``align`` up to ``limit`` in steps of about 1/8 of an octave, and ``limit`` itself."""
    out, k = set(), 1
    while k * align <= limit:
        out.add(k * align)
        k = max(k + 1, int(k * 1.09))
    out.add(limit)
    return sorted(out)


def plan_tiles(call: CallShape, maker: TileMaker, budget: int, size_by_budget: bool) -> tuple[int, int]:
    """See ``_plan_tiles``. Sized by the budget, the plan depends on the token count only through the per-token
    reserve, which is taken for the next power of two: batches of varying length then share a few cached plans."""
    if size_by_budget:
        call = dataclasses.replace(call, tokens=1 << max(call.tokens - 1, 0).bit_length())
    return _plan_tiles(call, maker, budget, size_by_budget)


@functools.lru_cache(maxsize=256)
def _plan_tiles(call: CallShape, maker: TileMaker, budget: int, size_by_budget: bool) -> tuple[int, int]:
    """(token rows, vocabulary rows) per tile. The vocabulary chunk comes from the shape without its tokens
    (``_joint_plan`` for unboundedly many tokens, every row gathered, no per-token reserve): it depends on V, D,
    the dtypes, the options and the budget, never on the batch, so that the chunks' boundaries, and the order in
    which a token's sums over the vocabulary are taken, are the same whatever other tokens share the call (batch
    invariance). The token rows are then the most that fit beside it (capped by the call's tokens unless
    ``size_by_budget``). Only a budget too small to hold one token row of that chunk beside the call's per-token
    vectors falls back to the joint plan of the call itself."""
    _, v = _joint_plan(dataclasses.replace(call, tokens=1 << 40, gathered=True), maker, budget, True, reserve=False)
    n, v_fit = _joint_plan(call, maker, budget, size_by_budget, only_v=v)
    if v_fit != v:
        return _joint_plan(call, maker, budget, size_by_budget)
    return n, v


def _joint_plan(call: CallShape, maker: TileMaker, budget: int, size_by_budget: bool,
                only_v: int | None = None, reserve: bool = True) -> tuple[int, int]:
    """(token rows, vocabulary rows) per tile: the shape whose buffers fit ``budget`` and which minimizes the
    accumulators' memory traffic, proportional to the chunk counts ceil(M / n) / M + ceil(V / v) / V (dH[n]
    crosses memory once per vocabulary chunk, dW_v once per token chunk); then evened out so that no chunk is short.

    ``size_by_budget``: plan as if the call had unboundedly many tokens, so that the buffers are the same whatever
    the batch (the CPU's flat memory); otherwise the plan is capped by the call's tokens (smaller buffers for short
    calls, and a wider vocabulary chunk when tokens are few). A budget too small for a 1 x 1 tile still gets one.
    ``only_v``: the vocabulary rows are given (already evened out); only the token rows are planned.
    ``reserve``: set aside the call's per-token vectors first (off for the token-free vocabulary plan).
    """
    align_n, align_v = maker.align
    tokens = 1 << 40 if size_by_budget else max(call.tokens, 1)
    max_v = max(call.vocab, 1)
    max_elements = None
    if maker.cpu_tile is not None and call.device_type == "cpu":
        max_elements, cap_v = maker.cpu_tile
        max_v = min(max_v, cap_v)

    if reserve:
        budget = max(budget - PER_TOKEN_BYTES * call.tokens, 1)  # the call's per-token vectors come first

    def fits(n, v):
        return buffers_nbytes(workspace_buffers(n, v, call, maker)) <= budget

    def chunks(rows, size):
        return -(-rows // size)

    def balanced(rows, size, align):
        # the same number of chunks, evened out: no short last chunk (a multiple of align, so never larger)
        even = chunks(rows, chunks(rows, size))
        return size if even >= size else min(size, -(-even // align) * align)

    best, best_cost = (1, 1), math.inf
    for v in ([only_v] if only_v is not None else _candidates(max_v, align_v)):
        hi = tokens if max_elements is None else max(1, min(tokens, max_elements // v))
        if not fits(1, v):
            break  # larger v only needs more
        lo = 1  # bisect the largest n that fits (bytes grow with n, except that n = tokens may drop dW's buffer)
        if fits(hi, v):
            lo = hi
        else:
            hi -= 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid, v) else (lo, mid - 1)
        n = lo if lo < align_n or lo >= tokens else lo // align_n * align_n
        # each accumulator row crosses memory once per chunk of the other side
        cost = chunks(tokens, n) / tokens + chunks(call.vocab, v) / call.vocab
        if cost < best_cost * (1 - 1e-9):
            best, best_cost = (n, v), cost
    n, v = best
    if not size_by_budget:
        n = balanced(tokens, n, align_n)
    return n, (v if only_v is not None else balanced(call.vocab, v, align_v))


class Workspace:
    """The named buffers of one call, allocated once and reused by every tile; ``view(name, rows, cols)`` is a
    contiguous view of a buffer's front. ``tile``: the (token rows, vocabulary rows) plan they were sized for."""

    def __init__(self, bufs: dict, device: torch.device, tile: tuple[int, int] | None = None):
        self.tile = tile
        self.bufs = {name: torch.empty(numel, dtype=dtype, device=device) for name, (numel, dtype) in bufs.items()
                     if name != VECTORS}

    def has(self, name: str) -> bool:
        return name in self.bufs

    def view(self, name: str, *shape: int) -> torch.Tensor:
        return self.bufs[name][: math.prod(shape)].view(*shape)


def call_shape(hidden, weight, bias, rows, labels, softcap, need_weight=True, need_bias=True, stats=0,
               entropy_grad=False) -> CallShape:
    dev = hidden.device
    g = gemm_dtype(hidden.dtype, dev)
    return CallShape(
        tokens=labels.shape[0], vocab=weight.shape[0], dim=weight.shape[1], input_dtype=hidden.dtype,
        gemm_dtype=g, device_type=dev.type, gathered=rows is not None, hidden_strided=hidden.stride(-1) != 1,
        weight_strided=weight.stride(-1) != 1, softcap=softcap is not None, need_weight=need_weight,
        need_bias=need_bias and bias is not None, fused_accumulate=fp32_gemm_support(dev.type)[1], stats=stats,
        entropy_grad=entropy_grad,
    )


def operand_rows(src: torch.Tensor, rows: torch.Tensor | None, r0: int, r1: int, ws: Workspace,
                 name: str, src_name: str | None = None) -> torch.Tensor:
    """Rows r0:r1 of ``src`` (through ``rows`` when given) in the workspace buffer's dtype: a view of ``src`` when
    no gather, conversion or copy to unit stride is needed, else written into buffer ``name``."""
    if not ws.has(name):
        return src[r0:r1]
    out = ws.view(name, r1 - r0, src.shape[1])
    if rows is None:
        return out.copy_(src[r0:r1])
    if src.dtype == out.dtype:
        return torch.index_select(src, 0, rows[r0:r1], out=out)
    # gather in the source dtype, then convert: no temporary outside the workspace
    assert src_name is not None, "a gather with a conversion needs the source-dtype buffer"
    return out.copy_(torch.index_select(src, 0, rows[r0:r1], out=ws.view(src_name, r1 - r0, src.shape[1])))


def backward_workspace(maker, hidden, weight, bias, rows, labels, softcap, need_weight, need_bias,
                       workspace_bytes=None, size_by_budget=False, tile=None, entropy_grad=False) -> Workspace:
    """The planned, allocated workspace of one backward call (``backward_loop`` documents the arguments)."""
    call = call_shape(hidden, weight, bias, rows, labels, softcap, need_weight, need_bias,
                      entropy_grad=entropy_grad)
    budget = default_workspace_bytes(hidden.device) if workspace_bytes is None else workspace_bytes
    if tile is None:
        plan = plan_tiles(call, maker, budget, size_by_budget)
    else:
        plan = (min(tile[0], labels.shape[0]), min(tile[1], weight.shape[0]))
    return Workspace(workspace_buffers(*plan, call, maker), hidden.device, tile=plan)


# ---------------------------------------------------------------------------------------------------------------
# Small calls on the CPU

# The CPU's BLAS (MKL) multiplies a product of fewer rows with other kernels, which round differently: a token's
# logits and hidden gradient would then depend on how many tokens share the call. Calls of fewer rows are padded
# to this many (zero hidden rows, no label, zero gradient), whose products round as a large call's rows do.
MIN_CPU_ROWS = 16


def pad_small_call(hidden, rows, labels, *vectors):
    """(hidden, rows, labels, *vectors, m) of a CPU call of m < ``MIN_CPU_ROWS`` scored tokens padded to that many
    (hidden compacted: rows None; padded labels -1, vectors 0), or None when no padding is needed."""
    m = labels.shape[0]
    if hidden.device.type != "cpu" or m == 0 or m >= MIN_CPU_ROWS:
        return None
    pad = MIN_CPU_ROWS - m
    kept = hidden if rows is None else hidden.index_select(0, rows)
    padded_hidden = torch.cat([kept, kept.new_zeros(pad, kept.shape[1])])
    padded_labels = torch.cat([labels, labels.new_full((pad,), -1)])
    padded = [None if v is None else torch.cat([v, v.new_zeros(pad)]) for v in vectors]
    return (padded_hidden, None, padded_labels, *padded, m)


# ---------------------------------------------------------------------------------------------------------------
# The tiles


@dataclass(frozen=True)
class Tile:
    """One (token chunk, vocabulary chunk) tile: scored rows n0:n1 against vocabulary rows v0:v1, with operands h
    (n, D) and w (v, D) in the GEMM dtype and the bias chunk b (v,) or None. ``last_n``: the vocabulary chunk's
    last token chunk (its accumulators are complete after this tile)."""

    n0: int
    n1: int
    v0: int
    v1: int
    h: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    last_n: bool


def tiles(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None,
          tokens: int, ws: Workspace) -> Iterator[Tile]:
    """The tiles of one loop over ``weight``'s rows, in the loop's order (vocabulary chunks outermost: the module
    docstring says why), sized by ``ws.tile``. Operands are made when the loop reaches them, through the
    workspace (``operand_rows``): w once per vocabulary chunk, h once per tile, or once per call when one token
    chunk covers every scored row. ``tokens`` (M) > 0 and V > 0."""
    assert ws.tile is not None, "the workspace of a tile loop carries its plan"
    n_plan, v_chunk = ws.tile
    n_chunk = min(n_plan, tokens)
    single = n_chunk >= tokens  # one token chunk: its operand rows are made once, not once per vocabulary chunk
    h_once = operand_rows(hidden, rows, 0, tokens, ws, "h", "h_src") if single else None
    vocab = weight.shape[0]
    for v0 in range(0, vocab, v_chunk):
        v1 = min(v0 + v_chunk, vocab)
        w = operand_rows(weight, None, v0, v1, ws, "w")
        b = None if bias is None else bias[v0:v1]
        for n0 in range(0, tokens, n_chunk):
            n1 = min(n0 + n_chunk, tokens)
            h = h_once if single else operand_rows(hidden, rows, n0, n1, ws, "h", "h_src")
            yield Tile(n0, n1, v0, v1, h, w, b, n1 == tokens)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def backward_loop(
    maker: TileMaker,
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
    size_by_budget: bool = False,
    tile: tuple[int, int] | None = None,
    on_step: Callable[[str], None] | None = None,
    out: tuple | None = None,
    workspace: Workspace | None = None,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_i grad_i * log p_i (+ grad_entropy_i * H_i), recomputing each logits tile once (see the
    module docstring); the entropy's term joins the same dz tile, so it costs no extra pass.

    Args:
        maker: the implementation's tile maker.
        hidden: (N, D) float32 / bfloat16 / float16; weight (V, D) same dtype; bias (V,) or None.
        rows: (M,) int64 hidden rows of the scored tokens, or None for all N rows (M = N).
        labels: (M,) int64 labels as rows of this weight; a label outside [0, V) gets no one-hot term (its
            vocabulary entry lives on another shard of a vocab-parallel head).
        lse: (M,) float32 global log-sum-exp of each scored row; grad: (M,) float32 upstream gradient.
        softcap, temperature: the logits transform.
        need_hidden, need_weight, need_bias: which gradients to compute.
        workspace_bytes: the temporaries' budget (``default_workspace_bytes(device)`` when None).
        size_by_budget: buffers sized for the budget, not the call (see ``plan_tiles``).
        tile: force the (token rows, vocabulary rows) of a tile (tests).
        on_step: called with "dz", "dH", "dW" or "other" before each step's work is issued, and "end" after the
            last (``benchmarks.roofline`` records CUDA events there to time the steps).
        out: (grad_hidden, grad_weight, grad_bias) to write into instead of new tensors (None where not needed):
            a vocabulary shard's rows of the whole gradients (``cpu_threads``).
        workspace: a ``Workspace`` made for this call by ``backward_workspace`` (the CPU threads get theirs from the
            calling thread); by default the loop makes its own.
        grad_entropy, entropy: (M,) float32 upstream gradient of each scored row's entropy and the entropy itself
            (from the forward's statistics), or None: dz_j gains -grad_entropy p_j (log p_j + H) before the chain
            rule (see ``torch_chunked``).

    Returns:
        grad_hidden: (M, D) float32, compact (row i belongs to hidden row ``rows[i]``), or None.
        grad_weight: (V, D) in weight's dtype, or None.  grad_bias: (V,) in bias's dtype, or None.
    """
    opts: dict[str, Any] = dict(softcap=softcap, temperature=temperature, need_hidden=need_hidden,
                                need_weight=need_weight, need_bias=need_bias, workspace_bytes=workspace_bytes,
                                size_by_budget=size_by_budget, tile=tile, on_step=on_step)
    if out is None and workspace is None:
        small = pad_small_call(hidden, rows, labels, lse, grad, grad_entropy, entropy)
        if small is not None:  # a few tokens on the CPU: rounded as in a large call (``MIN_CPU_ROWS``)
            h_pad, _, y_pad, lse_pad, g_pad, ge_pad, ent_pad, m = small
            d_hidden, d_weight, d_bias = backward_loop(maker, h_pad, weight, bias, None, y_pad, lse_pad, g_pad,
                                                       grad_entropy=ge_pad, entropy=ent_pad, **opts)
            return None if d_hidden is None else d_hidden[:m], d_weight, d_bias
    m_tokens = labels.shape[0]
    need_bias = need_bias and bias is not None
    needs = (need_hidden, need_weight, need_bias)
    if m_tokens == 0 or weight.shape[0] == 0:
        return _new_gradients(True, hidden, weight, bias, m_tokens, *needs)
    ent = None if grad_entropy is None else (grad_entropy, entropy)
    ws = workspace or backward_workspace(maker, hidden, weight, bias, rows, labels, softcap, need_weight, need_bias,
                                         workspace_bytes, size_by_budget, tile, entropy_grad=ent is not None)
    # every gradient element is written by its first tile and added to by the later ones: no zero fill
    out = _new_gradients(False, hidden, weight, bias, m_tokens, *needs) if out is None else out
    mark = on_step or (lambda step: None)
    step = functools.partial(_tile_products, maker, labels, lse, grad, ent, softcap, 1.0 / temperature, ws, out,
                             mark)
    for t in tiles(hidden, weight, bias, rows, m_tokens, ws):
        step(t)
    mark("end")
    return out


def _new_gradients(zero: bool, hidden, weight, bias, tokens: int, need_hidden: bool, need_weight: bool,
                   need_bias: bool) -> tuple:
    """(grad_hidden (M, D) fp32, grad_weight, grad_bias), None where not needed: zero-filled, or left empty for the
    loop, which writes every element before it adds to it."""
    new, like = (torch.zeros, torch.zeros_like) if zero else (torch.empty, torch.empty_like)
    return (new(tokens, weight.shape[1], device=hidden.device, dtype=torch.float32) if need_hidden else None,
            like(weight) if need_weight else None, like(bias) if need_bias else None)


def _tile_products(maker: TileMaker, labels, lse, grad, ent, softcap, inv_temp, ws: Workspace, out: tuple,
                   mark: Callable[[str], None], t: Tile) -> None:
    """One tile's step of the loop: dz from the tile maker, then dH[n] (+)= dz @ W_v, dW_v (+)= dz.T @ H_n and
    db_v (+)= sum_rows dz into the gradients ``out`` (None where not needed) or the workspace's fp32 chunk
    accumulators, which the chunk's last tile writes back."""
    d_hidden, d_weight, d_bias = out
    n0, n1, v0, v1, h, w = t.n0, t.n1, t.v0, t.v1, t.h, t.w
    dim = w.shape[1]
    dz = ws.view("dz", n1 - n0, dz_row_stride(v1 - v0, h.device.type))[:, : v1 - v0]
    mark("dz")
    if ent is None:
        maker.make_dz(h, w, t.b, labels[n0:n1], v0, lse[n0:n1], grad[n0:n1], softcap, inv_temp, dz, ws)
    else:
        maker.make_dz(h, w, t.b, labels[n0:n1], v0, lse[n0:n1], grad[n0:n1], softcap, inv_temp, dz, ws,
                      ent=(ent[0][n0:n1], ent[1][n0:n1]))
    if ws.has("dz_gemm"):
        dz = ws.view("dz_gemm", n1 - n0, v1 - v0).copy_(dz)
    if d_hidden is not None:
        mark("dH")
        prod = ws.view("prod", n1 - n0, dim) if ws.has("prod") else None
        matmul_fp32(d_hidden[n0:n1], dz, w, accumulate=v0 > 0, prod=prod)
    dw_acc = None if d_weight is None else ws.view("dw", v1 - v0, dim) if ws.has("dw") else d_weight[v0:v1]
    if dw_acc is not None:
        mark("dW")
        prod = ws.view("prod", v1 - v0, dim) if ws.has("prod") else None
        matmul_fp32(dw_acc, dz.T, h, accumulate=n0 > 0, prod=prod)
    mark("other")
    db_acc = None if d_bias is None else ws.view("db", v1 - v0) if ws.has("db") else d_bias[v0:v1]
    if db_acc is not None:  # fp32: the bias's own gradient, or the "db" chunk accumulator
        if n0 == 0:
            torch.sum(dz, 0, dtype=torch.float32, out=db_acc)
        else:
            db_acc.add_(torch.sum(dz, 0, dtype=torch.float32, out=ws.view("db_part", v1 - v0)))
    if t.last_n and ws.has("dw") and dw_acc is not None:
        d_weight[v0:v1] = dw_acc
    if t.last_n and ws.has("db") and db_acc is not None:
        d_bias[v0:v1] = db_acc
