"""cuBLAS logits, Triton epilogues: the tile maker that runs every product of the head on cuBLAS.

Same contract, arguments and per-tile math as ``fused_logprob.py`` (whose jit helpers ``transform``, ``fold``,
``_tile_dlogits`` and ``store_rounded`` it calls) and ``torch_chunked.py`` (the formulas). Where the fused kernels
form each logits tile with ``tl.dot`` on chip, here cuBLAS writes a block of raw logits a = H_n W_v^T (fp32
accumulation, fp32 output) into the workspace, and one Triton epilogue reads it once:

    forward   a = H_n @ W_v.T  (cuBLAS)  --_fold_kernel-->  the rows' running (max, sum exp, target, statistics)
    backward  a = H_n @ W_v.T  (cuBLAS)  --_dz_kernel---->  dz = g k (onehot - p) / T, rounded to the input dtype
              then the shared loop of ``tiled.py``: dH += dz @ W_v, dW_v += dz.T @ H_n (cuBLAS)

Why a third tile maker: on the H200, cuBLAS ran the head's gradient GEMMs at 0.81-0.89 of the bf16 peak where the
fused kernels' dot loops reached 0.51-0.57, and TRL's chunked head, whose four products are cuBLAS's, was 1.17x
faster than the fused kernels at N=16384, D=2048, V=248320 (``benchmarks/results/h200``). The price is an fp32
block written by the GEMM and read by the epilogue (8 bytes per logit and recomputation: 1 / (D / 4) of the
product's FLOPs per byte, 512 FLOP/B at D = 2048, under the H200's ridge of about 165) and a workspace that holds
it, so the blocks are smaller than the fused path's for the same budget. ``benchmarks.roofline`` models it; no GPU
has timed it yet, so ``backend="auto"`` does not choose it.

Determinism: the blocks, their order and every sum's owner are fixed, so results are bitwise reproducible on a
device. Not batch-invariant: cuBLAS picks its kernel, and with it the order of the D sum, by the block's shape, so
a row's logits can round differently when other rows share the call (the fused Triton forward is invariant).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiled
from .fused_logprob import INTERPRET, _tile_dlogits, fold, kernel_backward_loop, store_rounded, transform
from .tiled import TileMaker, default_workspace_bytes

__all__ = ["logprob_fwd", "logprob_bwd", "make_dz", "TILE_MAKER", "INTERPRET", "GPU_ALIGN"]


@triton.jit
def _fold_kernel(
    A, B, LABELS, STATE, M, V, stride_a, v0, state_stride, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, STATS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # BLOCK_N rows of an (M, V) block of raw logits: walk its columns tile by tile, fold each into the rows' running
    # statistics (STATE rows: max, sum exp, target, then the statistics' sums), one owner per row: no races, and
    # the blocks fold in a fixed order. ``v0``: the block's first column as a row of the weight (shard).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    # as columns of this block, in 32 bits (vocabularies are far below 2^31 rows)
    labels = (tl.load(LABELS + offs_n, mask=n_mask, other=-1) - v0).to(tl.int32)
    m_i = tl.load(STATE + offs_n, mask=n_mask, other=float("-inf"))
    s_i = tl.load(STATE + state_stride + offs_n, mask=n_mask, other=0.0)
    t_i = tl.load(STATE + 2 * state_stride + offs_n, mask=n_mask, other=0.0)
    a_i = tl.zeros((BLOCK_N,), tl.float32)
    q_i = tl.zeros((BLOCK_N,), tl.float32)
    u_i = tl.zeros((BLOCK_N,), tl.float32)
    r_i = tl.zeros((BLOCK_N,), tl.float32)
    if STATS >= 1:
        a_i = tl.load(STATE + 3 * state_stride + offs_n, mask=n_mask, other=0.0)
    if STATS >= 2:
        q_i = tl.load(STATE + 4 * state_stride + offs_n, mask=n_mask, other=0.0)
        u_i = tl.load(STATE + 5 * state_stride + offs_n, mask=n_mask, other=0.0)
        r_i = tl.load(STATE + 6 * state_stride + offs_n, mask=n_mask, other=0.0)
    # 32-bit offsets: a block lies in the workspace, far below 2^31 elements
    rows = offs_n[:, None] * stride_a
    for c0 in range(0, V, BLOCK_V):
        offs_v = c0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        a = tl.load(A + rows + offs_v[None, :], mask=n_mask[:, None] & v_mask[None, :], other=0.0)
        z, _ = transform(a, B, offs_v, v_mask, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
        # columns and labels are this block's; fold's fourth argument (the tile's first column as a weight row)
        # makes the arg-max a row of the weight
        m_i, s_i, t_i, a_i, q_i, u_i, r_i = fold(z, offs_v, v_mask, v0 + c0, labels, m_i, s_i, t_i, a_i, q_i, u_i,
                                                 r_i, STATS)
    tl.store(STATE + offs_n, m_i, mask=n_mask)
    tl.store(STATE + state_stride + offs_n, s_i, mask=n_mask)
    tl.store(STATE + 2 * state_stride + offs_n, t_i, mask=n_mask)
    if STATS >= 1:
        tl.store(STATE + 3 * state_stride + offs_n, a_i, mask=n_mask)
    if STATS >= 2:
        tl.store(STATE + 4 * state_stride + offs_n, q_i, mask=n_mask)
        tl.store(STATE + 5 * state_stride + offs_n, u_i, mask=n_mask)
        tl.store(STATE + 6 * state_stride + offs_n, r_i, mask=n_mask)


@triton.jit
def _dz_kernel(
    A, B, LABELS, LSE, GRAD, GRAD_ENT, ENT, DZ, M, V, stride_a, stride_dz, v0, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENT_GRAD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # one (BLOCK_N, BLOCK_V) piece of a backward tile: raw logits from the block, dz in DZ's dtype
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    labels = (tl.load(LABELS + offs_n, mask=n_mask, other=-1) - v0).to(tl.int32)  # as columns of this block
    lse = tl.load(LSE + offs_n, mask=n_mask, other=0.0)
    g = tl.load(GRAD + offs_n, mask=n_mask, other=0.0)
    if ENT_GRAD:  # the entropy's upstream gradient and the entropy itself (from the forward)
        g_ent = tl.load(GRAD_ENT + offs_n, mask=n_mask, other=0.0)
        ent = tl.load(ENT + offs_n, mask=n_mask, other=0.0)
    else:
        g_ent = g
        ent = g
    rows = offs_n[:, None]  # 32-bit offsets: a block and a dz tile lie in the workspace, below 2^31 elements
    mask = n_mask[:, None] & v_mask[None, :]
    a = tl.load(A + rows * stride_a + offs_v[None, :], mask=mask, other=0.0)
    z, t = transform(a, B, offs_v, v_mask, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
    dz = _tile_dlogits(z, t, lse, g, g_ent, ent, labels, offs_v, n_mask, v_mask, inv_temp, HAS_SOFTCAP,
                       ENT_GRAD)
    store_rounded(DZ + rows * stride_dz + offs_v[None, :], dz, mask, UPCAST)


# Launch shapes (BLOCK_N, BLOCK_V, num_warps, register cap or None): element-wise passes over fp32 blocks, 16 fp32
# values per thread and 16-byte loads along a row; they compile without spills for sm_80 and sm_90 under Triton
# 3.6 and 3.9 (benchmarks/results/compile/epilogue_report*.md); not yet timed on a GPU. The interpreter takes
# small tiles, so that tests cover many tiles and ragged edges on small shapes.
# The fold with all statistics (STATS 2) holds more per tile (the arg-max's indices beside exp(z - m)): at 128
# columns it sat at 255 registers, so it takes half-width tiles.
# The dz with the entropy term ("dz_ent") takes a cap that raises ptxas' budget: left to itself, Triton 3.6's ptxas
# aimed at 4 blocks per SM, used 128 registers and spilled 8 B (sm_80, with a soft-cap); under a 160 cap it keeps
# everything in 140-160 registers, 3 blocks per SM, as the variants without a soft-cap already ran.
_GPU_LAUNCH: dict[str, tuple[int, int, int, int | None]] = {
    "fold": (16, 128, 4, None), "fold_stats2": (16, 64, 4, None), "dz": (16, 128, 4, None),
    "dz_ent": (16, 128, 4, 160)}
_INTERPRET_LAUNCH: dict[str, tuple[int, int, int, int | None]] = {
    "fold": (16, 64, 1, None), "fold_stats2": (16, 64, 1, None), "dz": (16, 64, 1, None), "dz_ent": (16, 64, 1, None)}


def _launch(kernel: str) -> tuple[int, int, dict]:
    """(BLOCK_N, BLOCK_V, launch options) of an epilogue launch."""
    block_n, block_v, warps, regs = (_INTERPRET_LAUNCH if INTERPRET else _GPU_LAUNCH)[kernel]
    return block_n, block_v, {"num_warps": warps} if regs is None else {"num_warps": warps, "maxnreg": regs}


def _transform_args(softcap: float | None, temperature: float) -> tuple[float, float]:
    return (float(softcap) if softcap is not None else 1.0), 1.0 / float(temperature)


def _scratch(n, v, gemm_dtype, softcap, backward, extra=False):
    return {"a": (n * v, torch.float32)}  # the block of raw logits cuBLAS writes


def make_dz(h, w, b, labels, v0, lse, g, softcap, inv_temp, out, ws, ent=None) -> None:
    """The cuBLAS tile maker: raw logits h @ w.T into the workspace block "a" (fp32), then dz into ``out`` (n, v),
    rounded to out's dtype (see ``tiled.TileMaker`` for the arguments; ``ent``: (entropy's upstream gradient,
    entropy), each (n,) float32, or None)."""
    n, v = out.shape
    a = ws.view("a", n, v)
    tiled.matmul_fp32(a, h, w.T, accumulate=False)
    block_n, block_v, options = _launch("dz" if ent is None else "dz_ent")
    g_ent, entropy = (g, g) if ent is None else ent
    _dz_kernel[(triton.cdiv(n, block_n), triton.cdiv(v, block_v))](
        a, a if b is None else b, labels, lse, g, g_ent, entropy, out, n, v, a.stride(0), out.stride(0), v0,
        softcap if softcap is not None else 1.0, inv_temp, HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None,
        ENT_GRAD=ent is not None, UPCAST=INTERPRET, BLOCK_N=block_n, BLOCK_V=block_v, **options,
    )


# dz is rounded to the input dtype, as the fused kernel rounds it; tile sides are multiples of the epilogues'
# blocks on a GPU (and of cuBLAS's preferred 16 rows); the interpreter's small blocks let tests cover ragged tiles
GPU_ALIGN = (64, 256)
TILE_MAKER = TileMaker(make_dz=make_dz, dz_dtype=lambda input_dtype, gemm_dtype: input_dtype, scratch=_scratch,
                       align=(16, 64) if INTERPRET else GPU_ALIGN)


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
    stats: int = 0,
) -> tuple[torch.Tensor, ...]:
    """cuBLAS-and-epilogue version of ``torch_chunked.logprob_fwd``: same arguments and partial statistics
    (row_max, sum_exp, target_logit, each (M,) float32, and with ``stats`` > 0 the extra partials of ``stats.py``).

    Walks the (vocabulary chunk, token chunk) blocks of ``tiled.tiles``, planned within ``workspace_bytes``: each
    block's raw logits are one cuBLAS product into the workspace, folded by ``_fold_kernel`` into the rows' running
    statistics in vocabulary order.
    """
    from . import stats as st

    m_tokens = labels.shape[0]
    vocab = weight.shape[0]
    dev = hidden.device
    st.n_partials(stats)  # checks the level
    if stats >= 2 and vocab >= st.MAX_ARG_VOCAB:
        raise ValueError(f"token statistics need a vocabulary (shard) below {st.MAX_ARG_VOCAB} rows, got {vocab}")
    state = torch.stack(st.empty(m_tokens, stats, dev))  # (k, M): the running statistics, one row each
    if m_tokens == 0 or vocab == 0:
        return tuple(state)
    bias = None if bias is None else bias.contiguous()
    labels = labels.contiguous()
    budget = default_workspace_bytes(dev) if workspace_bytes is None else workspace_bytes
    call = tiled.call_shape(hidden, weight, bias, rows, labels, softcap, stats=stats)
    plan = tiled.plan_tiles(call, TILE_MAKER, budget, size_by_budget=dev.type == "cpu")
    ws = tiled.Workspace(tiled.workspace_buffers(*plan, call, TILE_MAKER, backward=False), dev, tile=plan)
    softcap_arg, inv_temp = _transform_args(softcap, temperature)
    block_n, block_v, options = _launch("fold_stats2" if stats >= 2 else "fold")
    for t in tiled.tiles(hidden, weight, bias, rows, m_tokens, ws):
        n, v = t.n1 - t.n0, t.v1 - t.v0
        a = ws.view("a", n, v)
        tiled.matmul_fp32(a, t.h, t.w.T, accumulate=False)
        _fold_kernel[(triton.cdiv(n, block_n),)](
            a, a if t.b is None else t.b, labels[t.n0:t.n1], state[:, t.n0:], n, v, a.stride(0), t.v0,
            state.stride(0), softcap_arg, inv_temp, HAS_BIAS=t.b is not None, HAS_SOFTCAP=softcap is not None,
            STATS=stats, BLOCK_N=block_n, BLOCK_V=block_v, **options,
        )
    return tuple(state)


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
    """cuBLAS-and-epilogue version of ``torch_chunked.logprob_bwd``: the shared tile loop (``tiled.backward_loop``)
    with ``make_dz`` above; same arguments and (grad_hidden fp32 compact, grad_weight, grad_bias). ``tile`` forces
    the tile shape (tests); ``on_step`` marks the steps (``benchmarks.roofline``)."""
    return kernel_backward_loop(
        TILE_MAKER, hidden, weight, bias, rows, labels, lse, grad, softcap=softcap, temperature=temperature,
        need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, workspace_bytes=workspace_bytes,
        tile=tile, on_step=on_step, grad_entropy=grad_entropy, entropy=entropy)
