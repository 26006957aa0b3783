"""Per-token log-probabilities in chunked PyTorch: the implementation for every device without Triton.

It computes what the Triton kernels in ``fused_logprob.py`` compute, with the same arguments and outputs. A GPU
spreads (token tile, vocabulary tile) pairs over its programs; here a Python loop walks vocabulary chunks (outer:
each weight chunk is read once) and token chunks (inner). Tiles are sized by ``plan_chunks``: within the workspace
budget, and on the CPU of a measured size (4 MiB) at which the element-wise passes after each matrix product stay
cheap, since on a CPU those passes can cost as much as the product itself.

The math, for a token with hidden state h, label y, and the logits transform of ``fastkto.fused_logprobs``:

    a_j = h . w_j + b_j                          raw logit of vocabulary row j
    s_j = c tanh(a_j / c)                        soft-capped (c = softcap), or s_j = a_j without soft-cap
    z_j = s_j / T                                tempered (T = temperature)
    lse = m + log sum_j exp(z_j - m)             online over vocabulary chunks, m the running max
    log p(y) = z_y - lse

Backward, for an upstream gradient g of log p(y), with p_j = exp(z_j - lse) and k_j = 1 - tanh^2(a_j / c)
(k_j = 1 without soft-cap):

    da_j = (g / T) k_j (1[j = y] - p_j)
    dh   = (g / T) (k_y w_y - sum_j k_j p_j w_j)
    dw_j = sum_tokens da_j h      db_j = sum_tokens da_j

The kernels form da on the tile and multiply; here the per-token factor g / T and the one-hot term are moved onto
the small (tokens, D) operands, which saves passes over the tile: only p (times k) is formed tile-wide.
Nothing of size tokens x vocabulary is ever allocated: the workspace is bounded by ``workspace_bytes``.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["logprob_fwd", "logprob_bwd", "plan_chunks", "default_workspace_bytes"]

_DEFAULT_WORKSPACE_MIB = 64


def default_workspace_bytes() -> int:
    """The PyTorch path's workspace budget in bytes: ``$FASTKTO_WORKSPACE_MIB`` MiB, 64 MiB when unset."""
    raw = os.environ.get("FASTKTO_WORKSPACE_MIB")
    if raw is None or raw == "":
        return _DEFAULT_WORKSPACE_MIB << 20
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"FASTKTO_WORKSPACE_MIB must be a positive number of MiB, got {raw!r}") from None
    if not mib > 0:
        raise ValueError(f"FASTKTO_WORKSPACE_MIB must be a positive number of MiB, got {raw!r}")
    return int(mib * (1 << 20))


# CPU tile shape, measured (2-core AMD EPYC, torch 2.13, 2 threads; SmolLM2's head at 256 to 4096 tokens): up to
# 1024 tokens x 1024 vocabulary rows (4 MiB of fp32) was fastest among 1024-4096 rows x 1-16 MiB tiles. Smaller
# tiles pay per-operation threading overhead on every element-wise pass; larger ones leave the caches.
_CPU_TILE_ELEMENTS = 1 << 20
_CPU_MAX_VOCAB_CHUNK = 1024


def plan_chunks(
    n_tokens: int, vocab: int, hidden_size: int, workspace_bytes: int, device: torch.device | str = "cpu",
    weight_dtype: torch.dtype = torch.float32,
) -> tuple[int, int]:
    """Choose (token chunk, vocabulary chunk) so that the workspace (see ``_Workspace``) fits ``workspace_bytes``.

    The workspace holds, in fp32: two (n, v) tiles (logits; tanh with a soft-cap), three (n, D) row buffers and,
    for a 16-bit weight, its chunk and the chunk's gradient accumulator (2 v D). The vocabulary chunk takes at most
    a quarter of the budget, the tiles the rest. ``n_tokens`` only caps the plan for calls with fewer tokens. A
    budget too small for a 1 x 1 tile still gets one. On the CPU the tile shape is further capped (measured best).
    """
    floats = max(workspace_bytes // 4, 1)
    cpu = torch.device(device).type == "cpu"
    v = max(1, min(vocab, floats // (4 * hidden_size)))
    if cpu:
        v = min(v, _CPU_MAX_VOCAB_CHUNK)
    vocab_side = 0 if weight_dtype == torch.float32 else 2 * v * hidden_size
    n = max(1, min(n_tokens, (floats - vocab_side) // (2 * v + 4 * hidden_size)))
    if cpu:
        n = max(1, min(n, _CPU_TILE_ELEMENTS // v))
    return n, v


class _Workspace:
    """The fixed scratch memory of one forward or backward call, reused by every tile.

    It is sized by the plan for the full budget, not by the batch: a call's temporaries are the same whether it
    scores 10 tokens or 10 million, so the memory a trainer sees does not move with the batch's masking (untouched
    pages of the tail cost no resident memory). Buffers are flat, and each use takes a contiguous (rows, cols)
    view of the front.
    """

    def __init__(self, n, v, hidden, weight, rows, softcap, inv_temp, backward):
        dim = weight.shape[1]
        dev = weight.device

        def buf(numel, dtype=torch.float32):
            return torch.empty(numel, device=dev, dtype=dtype)

        self.z = buf(n * v)
        self.t = buf(n * v) if softcap is not None else None
        # hidden rows as fp32: a gather (rows), a conversion (16-bit) or, for contiguous fp32 slices, a view
        copy_rows = rows is not None or hidden.dtype != torch.float32
        self.h = buf(n * dim) if copy_rows else None
        self.h16 = buf(n * dim, hidden.dtype) if rows is not None and hidden.dtype != torch.float32 else None
        self.scaled = buf(n * dim) if softcap is not None or inv_temp != 1.0 else None
        self.rowwise = buf(n * dim) if backward else None
        self.w = buf(v * dim) if weight.dtype != torch.float32 else None

    @staticmethod
    def view(flat, *shape):
        numel = 1
        for size in shape:
            numel *= size
        return flat[:numel].view(*shape)


def _weight_chunk(weight, v0, v1, ws):
    """Weight rows v0:v1 as fp32: a view of an fp32 weight, or a conversion into the workspace."""
    if ws.w is None:
        return weight[v0:v1]
    return ws.view(ws.w, v1 - v0, weight.shape[1]).copy_(weight[v0:v1])


def _hidden_chunk(hidden, rows, n0, n1, ws):
    """Hidden rows n0:n1 of the scored tokens (through ``rows`` when given) as fp32, without allocating."""
    if ws.h is None:
        return hidden[n0:n1]
    out = ws.view(ws.h, n1 - n0, hidden.shape[1])
    if rows is None:
        return out.copy_(hidden[n0:n1])
    if ws.h16 is None:
        return torch.index_select(hidden, 0, rows[n0:n1], out=out)
    return out.copy_(torch.index_select(hidden, 0, rows[n0:n1], out=ws.view(ws.h16, n1 - n0, hidden.shape[1])))


def _add_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] += src[i], deterministically (labels repeat): CUDA's index_put_ with accumulate sorts the
    indices; the CPU's index_add_ runs in index order."""
    if dst.device.type == "cuda":
        dst.index_put_((index,), src, accumulate=True)
    else:
        dst.index_add_(0, index, src)


def _tile_logits(h, w, b, softcap, inv_temp, ws):
    """z = transform(h @ w.T + b) for one (n, v) tile in fp32, and t = tanh(a / c) (None without soft-cap).

    The scalar factors (1/T, or 1/c before the tanh) are applied to the (n, D) rows and the bias, not the tile.
    """
    n, v = h.shape[0], w.shape[0]
    z = ws.view(ws.z, n, v)
    if softcap is None:
        hs = h if inv_temp == 1.0 else torch.mul(h, inv_temp, out=ws.view(ws.scaled, *h.shape))
        torch.mm(hs, w.T, out=z)
        if b is not None:
            z.add_(b, alpha=inv_temp)
        return z, None
    t = ws.view(ws.t, n, v)
    torch.mm(torch.mul(h, 1.0 / softcap, out=ws.view(ws.scaled, *h.shape)), w.T, out=t)
    if b is not None:
        t.add_(b, alpha=1.0 / softcap)
    t.tanh_()
    return torch.mul(t, softcap * inv_temp, out=z), t


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online log-sum-exp statistics and target logits of this weight's vocabulary rows.

    Args:
        hidden: (N, D) float32 / bfloat16 / float16.
        weight: (V, D), same dtype; bias: (V,) or None.
        rows: (M,) int64 indices of the hidden rows to score, or None for all N rows (M = N).
        labels: (M,) int64 label of each scored row, as an index into ``weight``'s rows; a label outside [0, V)
            adds no target logit (its vocabulary entry lives on another shard).
        softcap, temperature: the logits transform (see module docstring).
        workspace_bytes: the temporaries' budget; ``default_workspace_bytes()`` when None.

    Returns:
        (row_max, sum_exp, target_logit), each (M,) float32: lse = row_max + log(sum_exp) over these V rows,
        and z_y where the label is in [0, V), else 0.
    """
    m_tokens = labels.shape[0]
    vocab, dim = weight.shape
    dev = hidden.device
    row_max = torch.full((m_tokens,), -math.inf, device=dev, dtype=torch.float32)
    sum_exp = torch.zeros(m_tokens, device=dev, dtype=torch.float32)
    target = torch.zeros(m_tokens, device=dev, dtype=torch.float32)
    if m_tokens == 0 or vocab == 0:
        return row_max, sum_exp, target
    budget = default_workspace_bytes() if workspace_bytes is None else workspace_bytes
    inv_temp = 1.0 / temperature
    n_plan, v_chunk = plan_chunks(2**62, vocab, dim, budget, dev, weight.dtype)
    ws = _Workspace(n_plan, v_chunk, hidden, weight, rows, softcap, inv_temp, backward=False)
    n_chunk = min(n_plan, m_tokens)
    for v0 in range(0, vocab, v_chunk):
        v1 = min(v0 + v_chunk, vocab)
        w = _weight_chunk(weight, v0, v1, ws)
        b = None if bias is None else bias[v0:v1].float()
        for n0 in range(0, m_tokens, n_chunk):
            n1 = min(n0 + n_chunk, m_tokens)
            z, _ = _tile_logits(_hidden_chunk(hidden, rows, n0, n1, ws), w, b, softcap, inv_temp, ws)
            local = labels[n0:n1] - v0
            in_tile = (local >= 0) & (local < v1 - v0)
            picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            target[n0:n1] += torch.where(in_tile, picked, 0.0)
            m_old = row_max[n0:n1]
            m_new = torch.maximum(m_old, z.amax(dim=1))
            sum_exp[n0:n1] = sum_exp[n0:n1] * torch.exp(m_old - m_new) + z.sub_(m_new[:, None]).exp_().sum(dim=1)
            row_max[n0:n1] = m_new
    return row_max, sum_exp, target


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_i grad_i * log p_i, recomputing each logits tile.

    Args: as ``logprob_fwd``, plus
        lse: (M,) float32 global log-sum-exp of each scored row (over all shards).
        grad: (M,) float32 upstream gradient of each scored row's log-probability.
        need_hidden, need_weight, need_bias: which gradients to compute.

    Returns:
        grad_hidden: (M, D) float32, compact (row i belongs to hidden row ``rows[i]``), or None.
        grad_weight: (V, D) in weight's dtype, or None.  grad_bias: (V,) in bias's dtype, or None.
    """
    m_tokens = labels.shape[0]
    vocab, dim = weight.shape
    dev = hidden.device
    need_bias = need_bias and bias is not None
    d_hidden = torch.zeros(m_tokens, dim, device=dev, dtype=torch.float32) if need_hidden else None
    if m_tokens == 0 or vocab == 0:
        return (d_hidden, torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    # every vocabulary chunk of the gradients is written by its first token chunk below
    d_weight = torch.empty_like(weight) if need_weight else None
    d_bias = torch.empty_like(bias) if need_bias else None
    budget = default_workspace_bytes() if workspace_bytes is None else workspace_bytes
    inv_temp = 1.0 / temperature
    n_plan, v_chunk = plan_chunks(2**62, vocab, dim, budget, dev, weight.dtype)
    ws = _Workspace(n_plan, v_chunk, hidden, weight, rows, softcap, inv_temp, backward=True)
    n_chunk = min(n_plan, m_tokens)
    # fp32 accumulators of one vocabulary chunk's gradients: the gradient's own rows when it is fp32
    dw_buf = torch.empty(v_chunk * dim, device=dev) if need_weight and weight.dtype != torch.float32 else None
    db_buf = torch.empty(v_chunk, device=dev) if need_bias and bias.dtype != torch.float32 else None
    for v0 in range(0, vocab, v_chunk):
        v1 = min(v0 + v_chunk, vocab)
        w = _weight_chunk(weight, v0, v1, ws)
        b = None if bias is None else bias[v0:v1].float()
        dw_acc = db_acc = None
        if need_weight:
            dw_acc = d_weight[v0:v1] if dw_buf is None else ws.view(dw_buf, v1 - v0, dim)
        if need_bias:
            db_acc = d_bias[v0:v1] if db_buf is None else db_buf[: v1 - v0]
        for n0 in range(0, m_tokens, n_chunk):
            n1 = min(n0 + n_chunk, m_tokens)
            h = _hidden_chunk(hidden, rows, n0, n1, ws)
            rowwise = ws.view(ws.rowwise, n1 - n0, dim)
            z, t = _tile_logits(h, w, b, softcap, inv_temp, ws)
            local = labels[n0:n1] - v0
            in_tile = (local >= 0) & (local < v1 - v0)
            local = local.clamp(0, v1 - v0 - 1)
            g = grad[n0:n1] * inv_temp
            # one-hot coefficient g k_y / T, zero for rows whose label lies in another chunk
            onehot = torch.where(in_tile, g, 0.0)
            p = z.sub_(lse[n0:n1, None]).exp_()
            if t is not None:
                onehot = onehot * (1 - t.gather(1, local[:, None]).squeeze(1) ** 2)
                p.addcmul_(p, t.square_(), value=-1.0)  # p_j k_j
            if need_hidden:
                d_hidden[n0:n1].addcmul_(torch.mm(p, w, out=rowwise), g[:, None], value=-1.0)
                d_hidden[n0:n1].addcmul_(torch.index_select(w, 0, local, out=rowwise), onehot[:, None])
            # the first token chunk writes the chunk's gradient, the others add to it: no zero-fill pass over the
            # (v, D) gradient, which at a few tokens costs as much memory traffic as the products themselves
            if need_weight:
                if n0 == 0:
                    torch.mm(p.T, torch.mul(h, g.neg()[:, None], out=rowwise), out=dw_acc)
                else:
                    dw_acc.addmm_(p.T, torch.mul(h, g[:, None], out=rowwise), alpha=-1.0)
                _add_rows(dw_acc, local, torch.mul(h, onehot[:, None], out=rowwise))
            if need_bias:
                if n0 == 0:
                    torch.mv(p.T, g.neg(), out=db_acc)
                else:
                    db_acc.addmv_(p.T, g, alpha=-1.0)
                _add_rows(db_acc, local, onehot)
        if dw_buf is not None:
            d_weight[v0:v1] = dw_acc
        if db_buf is not None:
            d_bias[v0:v1] = db_acc
    return d_hidden, d_weight, d_bias
