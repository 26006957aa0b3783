"""Per-token log-probabilities in chunked PyTorch: the implementation for every device without Triton.

It computes what the Triton kernels in ``fused_logprob.py`` compute, with the same arguments and outputs. The
forward walks the (vocabulary chunk, token chunk) tiles of ``tiled.tiles``, folding each logits tile into online
log-sum-exp statistics; the backward is the shared tile loop of ``tiled.py`` with ``make_dz`` below as its tile
maker. On the CPU both directions run on vocabulary shards, one per worker thread (``cpu_threads.py``). Tiles are
sized by ``tiled.plan_tiles`` within the workspace budget, and on the CPU capped at a measured size (``_CPU_TILE``)
at which the element-wise passes after each matrix product stay cheap. On CUDA the products take the 16-bit
inputs as they are (tensor cores, fp32 accumulation into an fp32 logits tile: no fp32 copy of the weight); on the
CPU, which has no such product, 16-bit chunks are converted to fp32 in the workspace.

The math, for a token with hidden state h, label y, and the logits transform of ``fastkto.fused_logprobs``:

    a_j = h . w_j + b_j                          raw logit of vocabulary row j
    s_j = c tanh(a_j / c)                        soft-capped (c = softcap), or s_j = a_j without soft-cap
    z_j = s_j / T                                tempered (T = temperature)
    lse = m + log sum_j exp(z_j - m)             online over vocabulary chunks, m the running max
    log p(y) = z_y - lse

Backward, for an upstream gradient g of log p(y), with p_j = exp(z_j - lse) and k_j = 1 - tanh^2(a_j / c)
(k_j = 1 without soft-cap):

    dz_j = da_j = (g / T) k_j (1[j = y] - p_j)   the tile maker's output
    dh   = sum_j dz_j w_j                         dH += dz @ W     (the shared loop's GEMMs)
    dw_j = sum_tokens dz_j h                      dW += dz.T @ H   db_j = sum_tokens dz_j

Scalar factors are folded into the products where a BLAS call takes them (1/T, 1/c and the bias as addmm's alpha,
beta and input; lse as a broadcast input in the backward), so that a tile costs few passes over memory.
Nothing of size tokens x vocabulary is ever allocated: the workspace is bounded by ``workspace_bytes``.
"""

from __future__ import annotations

import torch

from . import cpu_threads, tiled
from .tiled import TileMaker, default_workspace_bytes

__all__ = ["logprob_fwd", "logprob_bwd", "make_dz", "TILE_MAKER", "default_workspace_bytes"]

# CPU tile shape, measured (2-core AMD EPYC, torch 2.13, 2 threads; SmolLM2's head at 256 to 4096 tokens): up to
# 1024 tokens x 1024 vocabulary rows (4 MiB of fp32) was fastest among 1024-4096 rows x 1-16 MiB tiles. Smaller
# tiles pay per-operation threading overhead on every element-wise pass; larger ones leave the caches.
_CPU_TILE = (1 << 20, 1024)  # (tile elements, vocabulary rows)


def _tile_logits(h, w, b, softcap, inv_temp, z, t, shift=None):
    """z = transform(h @ w.T + b) - shift[:, None] for one (n, v) tile, in fp32 (``shift``: the log-sum-exp, in
    the backward, or None); returns (z, t) with t = tanh(a / c), or None without a soft-cap."""
    scale = inv_temp if softcap is None else 1.0 / softcap
    a = z if softcap is None else t
    shifted = False
    if h.dtype == torch.float32:
        if b is not None:
            torch.addmm(b.float(), h, w.T, beta=scale, alpha=scale, out=a)
        elif shift is not None and softcap is None:
            torch.addmm(shift[:, None], h, w.T, beta=-1.0, alpha=scale, out=a)
            shifted = True
        elif scale == 1.0:
            torch.mm(h, w.T, out=a)
        else:
            torch.addmm(a, h, w.T, beta=0.0, alpha=scale, out=a)  # beta = 0: a's contents are not read
    else:  # 16-bit operands (CUDA): tensor-core product, fp32 output
        tiled.matmul_fp32(a, h, w.T, accumulate=False)
        if scale != 1.0:
            a.mul_(scale)
        if b is not None:
            a.add_(b, alpha=scale)
    if softcap is not None:
        t.tanh_()
        if shift is None:
            torch.mul(t, softcap * inv_temp, out=z)
        else:
            torch.add(shift.neg()[:, None], t, alpha=softcap * inv_temp, out=z)
            shifted = True
    if shift is not None and not shifted:
        z.sub_(shift[:, None])
    return z, t


def _tile_views(ws, n, v, softcap, z=None):
    z = ws.view("z", n, v) if z is None else z
    return z, (ws.view("t", n, v) if softcap is not None else None)


def make_dz(h, w, b, labels, v0, lse, g, softcap, inv_temp, out, ws, ent=None) -> None:
    """The PyTorch tile maker: dz of tokens h (n, D) against vocabulary rows w (v, D) into ``out`` (n, v) (see
    ``tiled.TileMaker``). The tile is formed in fp32; ``out`` is the fp32 tile itself, or (16-bit operands) the
    tile rounded once, after the one-hot term is added."""
    n, v = out.shape
    z, t = _tile_views(ws, n, v, softcap, out if out.dtype == torch.float32 else None)
    _tile_logits(h, w, b, softcap, inv_temp, z, t, shift=lse)
    local = labels - v0
    in_tile = (local >= 0) & (local < v)
    local = local.clamp(0, v - 1)[:, None]
    gt = g * inv_temp
    onehot = torch.where(in_tile, gt, 0.0)  # g k_y / T at the label's column, zero where the label is elsewhere
    coef = None
    if ent is not None:
        # with the entropy's gradient g_H: dz_j = k_j / T (g 1[j = y] - p_j (g + g_H (log p_j + H))), z = log p here
        g_ent, entropy = ent
        coef = ws.view("e", n, v)
        torch.add(z, entropy[:, None], out=coef).mul_(g_ent[:, None]).add_(g[:, None]).mul_(-inv_temp)
    p = z.exp_()
    if t is not None:
        onehot = onehot * (1 - t.gather(1, local).squeeze(1) ** 2)
        p.addcmul_(p, t.square_(), value=-1.0)  # p_j k_j
    p.mul_(gt.neg()[:, None] if coef is None else coef).scatter_add_(1, local, onehot[:, None])
    if out is not p:
        out.copy_(p)


def _scratch(n, v, gemm_dtype, softcap, backward, extra=False):
    bufs = {}
    if extra:  # token statistics (forward) or the entropy's gradient (backward): one more fp32 tile
        bufs["e"] = (n * v, torch.float32)
    if not backward or gemm_dtype != torch.float32:  # with fp32 operands the backward forms dz in place
        bufs["z"] = (n * v, torch.float32)
    if softcap:
        bufs["t"] = (n * v, torch.float32)
    return bufs


TILE_MAKER = TileMaker(make_dz=make_dz, dz_dtype=lambda input_dtype, gemm_dtype: gemm_dtype, scratch=_scratch,
                       align=(16, 16), cpu_tile=_CPU_TILE)


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
    """Online log-sum-exp statistics and target logits of this weight's vocabulary rows.

    Args:
        hidden: (N, D) float32 / bfloat16 / float16.
        weight: (V, D), same dtype; bias: (V,) or None.
        rows: (M,) int64 indices of the hidden rows to score, or None for all N rows (M = N).
        labels: (M,) int64 label of each scored row, as an index into ``weight``'s rows; a label outside [0, V)
            adds no target logit (its vocabulary entry lives on another shard).
        softcap, temperature: the logits transform (see module docstring).
        workspace_bytes: the temporaries' budget; ``default_workspace_bytes(device)`` when None.
        stats: which token statistics to carry along (``kernels.stats``: 0 none, 1 entropy, 2 all).

    Returns:
        (row_max, sum_exp, target_logit), each (M,) float32: lse = row_max + log(sum_exp) over these V rows,
        and z_y where the label is in [0, V), else 0; with ``stats`` > 0 followed by the extra partial sums of
        ``kernels.stats`` (a; and q, u, the first arg-max as a float row index).
    """
    from . import stats as st

    st.n_partials(stats)
    small = tiled.pad_small_call(hidden, rows, labels)
    if small is not None:  # a few tokens on the CPU: rounded as in a large call (``tiled.MIN_CPU_ROWS``)
        h_pad, _, y_pad, m = small
        part = logprob_fwd(h_pad, weight, bias, None, y_pad, softcap=softcap, temperature=temperature,
                           workspace_bytes=workspace_bytes, stats=stats)
        return tuple(t[:m] for t in part)
    m_tokens = labels.shape[0]
    budget = default_workspace_bytes(hidden.device) if workspace_bytes is None else workspace_bytes
    call = tiled.call_shape(hidden, weight, bias, rows, labels, softcap, stats=stats)
    workers = cpu_threads.forward_workers(call, TILE_MAKER) if m_tokens else 1
    if workers == 1:
        return _forward(hidden, weight, bias, rows, labels, softcap, temperature, budget, stats=stats)
    per_worker = budget // workers
    parts = cpu_threads.vocab_sharded(
        weight, bias, labels, workers, TILE_MAKER,
        lambda w, b, y: _forward_workspace(hidden, w, b, rows, y, softcap, per_worker, stats),
        lambda sh: _forward(hidden, sh.weight, sh.bias, rows, sh.labels, softcap, temperature, per_worker,
                            sh.workspace, stats))
    if stats >= 2:  # the shards' arg-max as rows of this weight
        spans = cpu_threads.shards(call.vocab, workers, TILE_MAKER)
        parts = [(*p[:6], p[6] + v0) for p, (v0, _) in zip(parts, spans)]
    # merge the shards' statistics in shard order, element-wise per token: deterministic and batch-invariant
    return st.merge(parts)


def _forward_workspace(hidden, weight, bias, rows, labels, softcap, budget, stats=0) -> tiled.Workspace:
    call = tiled.call_shape(hidden, weight, bias, rows, labels, softcap, stats=stats)
    plan = tiled.plan_tiles(call, TILE_MAKER, budget, size_by_budget=hidden.device.type == "cpu")
    return tiled.Workspace(tiled.workspace_buffers(*plan, call, TILE_MAKER, backward=False), hidden.device,
                           tile=plan)


def _forward(hidden, weight, bias, rows, labels, softcap, temperature, budget, ws=None, stats=0):
    """The forward's tile loop over these vocabulary rows, on the calling thread (``logprob_fwd``'s partials)."""
    from . import stats as st

    m_tokens, vocab = labels.shape[0], weight.shape[0]
    part = st.empty(m_tokens, stats, hidden.device)
    row_max, sum_exp, target = part[:3]
    if m_tokens == 0 or vocab == 0:
        return part
    ws = ws or _forward_workspace(hidden, weight, bias, rows, labels, softcap, budget, stats)
    inv_temp = 1.0 / temperature
    for t in tiled.tiles(hidden, weight, bias, rows, m_tokens, ws):
        n0, n1, v0, v1 = t.n0, t.n1, t.v0, t.v1
        z, _ = _tile_logits(t.h, t.w, t.b, softcap, inv_temp, *_tile_views(ws, n1 - n0, v1 - v0, softcap))
        local = labels[n0:n1] - v0
        in_tile = (local >= 0) & (local < v1 - v0)
        picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        target[n0:n1] += torch.where(in_tile, picked, 0.0)
        m_old = row_max[n0:n1]
        tile_max = z.amax(dim=1)
        m_new = torch.maximum(m_old, tile_max)
        if stats:
            _fold_stats(part, n0, n1, v0, z, tile_max, m_old, m_new, ws, stats)
            row_max[n0:n1] = m_new
            continue
        sum_exp[n0:n1] = sum_exp[n0:n1] * torch.exp(m_old - m_new) + z.sub_(m_new[:, None]).exp_().sum(dim=1)
        row_max[n0:n1] = m_new
    return part


def _fold_stats(part, n0, n1, v0, z, tile_max, m_old, m_new, ws, stats) -> None:
    """Fold one (n, v) logits tile ``z`` (overwritten) into the running statistics of rows n0:n1 (``stats.py``:
    sum exp, a = sum exp(z - m) (z - m); with ``stats`` 2 also q, u and the first arg-max), as the Triton kernel
    does per tile."""
    sum_exp = part[1]
    alpha = torch.exp(m_old - m_new)
    s_old = sum_exp[n0:n1]
    if stats >= 2:
        part[5][n0:n1] += z.sum(dim=1)
        # argmax returns the first maximum; a later tile takes over only with a strictly larger max
        first = z.argmax(dim=1).to(torch.float32) + v0
        part[4][n0:n1] = part[4][n0:n1] * (alpha * alpha)
        part[6][n0:n1] = torch.where(tile_max > m_old, first, part[6][n0:n1])
    e = ws.view("e", *z.shape)
    torch.exp(z.sub_(m_new[:, None]), out=e)  # z - m <= 0 and its exponential
    shift = torch.where(s_old > 0, (m_old - m_new) * s_old, 0.0)
    a_tile = z.mul_(e).sum(dim=1)
    part[3][n0:n1] = alpha * (part[3][n0:n1] + shift) + a_tile
    sum_exp[n0:n1] = s_old * alpha + e.sum(dim=1)
    if stats >= 2:
        part[4][n0:n1] += e.square_().sum(dim=1)


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
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_i grad_i * log p_i (+ grad_entropy_i * H_i): the shared tile loop (``tiled.backward_loop``,
    which documents the arguments) with this module's tile maker, on the CPU on vocabulary shards
    (``cpu_threads``).

    Returns:
        grad_hidden: (M, D) float32, compact (row i belongs to hidden row ``rows[i]``), or None.
        grad_weight: (V, D) in weight's dtype, or None.  grad_bias: (V,) in bias's dtype, or None.
    """
    small = tiled.pad_small_call(hidden, rows, labels, lse, grad, grad_entropy, entropy)
    if small is not None:  # a few tokens on the CPU: rounded as in a large call (``tiled.MIN_CPU_ROWS``)
        h_pad, _, y_pad, lse_pad, g_pad, ge_pad, ent_pad, m = small
        d_hidden, d_weight, d_bias = logprob_bwd(
            h_pad, weight, bias, None, y_pad, lse_pad, g_pad, softcap=softcap, temperature=temperature,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, workspace_bytes=workspace_bytes,
            tile=tile, grad_entropy=ge_pad, entropy=ent_pad)
        return None if d_hidden is None else d_hidden[:m], d_weight, d_bias
    # on the CPU the buffers are sized by the budget, not the call: memory stays flat as batches change
    opts = dict(softcap=softcap, temperature=temperature, need_hidden=need_hidden, need_weight=need_weight,
                need_bias=need_bias, size_by_budget=hidden.device.type == "cpu", tile=tile,
                grad_entropy=grad_entropy, entropy=entropy)
    ent_grad = grad_entropy is not None
    m_tokens = labels.shape[0]
    budget = default_workspace_bytes(hidden.device) if workspace_bytes is None else workspace_bytes
    call = tiled.call_shape(hidden, weight, bias, rows, labels, softcap, need_weight, need_bias,
                            entropy_grad=ent_grad)
    workers = cpu_threads.backward_workers(call, budget, TILE_MAKER) if m_tokens and tile is None else 1
    if workers == 1:
        return tiled.backward_loop(TILE_MAKER, hidden, weight, bias, rows, labels, lse, grad, workspace_bytes=budget,
                                   **opts)
    return _backward_on_threads(hidden, weight, bias, rows, labels, lse, grad, call, budget, workers, opts)


def _backward_on_threads(hidden, weight, bias, rows, labels, lse, grad, call, budget, workers, opts):
    """``logprob_bwd`` on ``workers`` vocabulary shards (``cpu_threads``): each shard's loop writes its rows of
    the weight and bias gradients; shard 0 accumulates into the hidden gradient itself, the others into their own
    (M, D) fp32 partials, summed in shard order."""
    need_hidden, need_weight = opts["need_hidden"], opts["need_weight"]
    need_bias = opts["need_bias"] and bias is not None
    d_hidden = torch.empty(call.tokens, call.dim, device=hidden.device) if need_hidden else None
    partial = [torch.empty_like(d_hidden) for _ in range(workers - 1)] if need_hidden else []
    d_weight = torch.empty_like(weight) if need_weight else None
    d_bias = torch.empty_like(bias) if need_bias else None
    per_worker = cpu_threads.per_worker_budget(call, budget, workers)

    def workspace(w, b, y):
        return tiled.backward_workspace(TILE_MAKER, hidden, w, b, rows, y, opts["softcap"], need_weight, need_bias,
                                        per_worker, size_by_budget=True, entropy_grad=call.entropy_grad)

    def run(sh: cpu_threads.Shard):
        out = (None if d_hidden is None else (d_hidden if sh.index == 0 else partial[sh.index - 1]),
               None if d_weight is None else d_weight[sh.v0:sh.v1], None if d_bias is None else d_bias[sh.v0:sh.v1])
        tiled.backward_loop(TILE_MAKER, hidden, sh.weight, sh.bias, rows, sh.labels, lse, grad,
                            workspace_bytes=per_worker, out=out, workspace=sh.workspace, **opts)

    cpu_threads.vocab_sharded(weight, bias, labels, workers, TILE_MAKER, workspace, run)
    for part in partial:
        d_hidden.add_(part)
    return d_hidden, d_weight, d_bias
