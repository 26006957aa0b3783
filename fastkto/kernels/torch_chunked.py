"""Per-token log-probabilities in chunked PyTorch: the implementation for every device without Triton.

It computes what the Triton kernels in ``fused_logprob.py`` compute, with the same arguments and outputs. A GPU
spreads (token tile, vocabulary tile) pairs over its programs; here a Python loop walks vocabulary chunks (outer:
each weight chunk is read once) and token chunks (inner). Tiles are sized by ``plan_chunks``: within the workspace
budget, and on the CPU small enough (about 1 MiB) that the element-wise passes after each matrix product run in
cache, since on a CPU those passes cost as much as the product itself.

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


# On the CPU a tile of at most this many fp32 elements (1 MiB) keeps the element-wise passes in L2; the vocabulary
# chunk is capped so that tiles keep at least 64 tokens (matrix products stay efficient).
_CPU_TILE_ELEMENTS = 1 << 18
_CPU_MAX_VOCAB_CHUNK = 4096


def plan_chunks(
    n_tokens: int, vocab: int, hidden_size: int, workspace_bytes: int, device: torch.device | str = "cpu"
) -> tuple[int, int]:
    """Choose (token chunk, vocabulary chunk) so that the temporaries fit ``workspace_bytes``.

    Per vocabulary chunk of v rows the backward holds an fp32 copy of the weight rows and an fp32 weight-gradient
    accumulator (2 v D floats); per token chunk of n rows up to five (n, D) fp32 operands; per tile up to three
    (n, v) fp32 temporaries. Half the budget goes to the vocabulary side, the rest to the tiles. A budget too
    small for a 1 x 1 tile still gets one. On the CPU tiles are further capped to stay cache-sized.
    """
    floats = max(workspace_bytes // 4, 1)
    v = max(1, min(vocab, floats // (4 * hidden_size)))
    if torch.device(device).type == "cpu":
        v = min(v, _CPU_MAX_VOCAB_CHUNK)
    n = max(1, min(n_tokens, (floats - 2 * v * hidden_size) // (3 * v + 5 * hidden_size)))
    if torch.device(device).type == "cpu":
        n = max(1, min(n, _CPU_TILE_ELEMENTS // v))
    return n, v


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _gather_rows(hidden: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    if rows is None:
        return _fp32(hidden[start:stop])
    return _fp32(hidden.index_select(0, rows[start:stop]))


def _add_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] += src[i], deterministically (labels repeat): CUDA's index_put_ with accumulate sorts the
    indices; the CPU's index_add_ runs in index order."""
    if dst.device.type == "cuda":
        dst.index_put_((index,), src, accumulate=True)
    else:
        dst.index_add_(0, index, src)


def _tile_logits(h, w, b, softcap, inv_temp):
    """z = transform(h @ w.T + b) for one (n, v) tile in fp32, and t = tanh(a / c) (None without soft-cap).

    The scalar factors (1/T, or 1/c before the tanh) are applied to the (n, D) rows and the bias, not the tile.
    """
    if softcap is None:
        z = (h * inv_temp if inv_temp != 1.0 else h) @ w.T
        if b is not None:
            z += b * inv_temp
        return z, None
    t = (h * (1.0 / softcap)) @ w.T
    if b is not None:
        t += b * (1.0 / softcap)
    t.tanh_()
    return t * (softcap * inv_temp), t


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
    n_chunk, v_chunk = plan_chunks(m_tokens, vocab, dim, budget, dev)
    inv_temp = 1.0 / temperature
    for v0 in range(0, vocab, v_chunk):
        v1 = min(v0 + v_chunk, vocab)
        w = _fp32(weight[v0:v1])
        b = None if bias is None else _fp32(bias[v0:v1])
        for n0 in range(0, m_tokens, n_chunk):
            n1 = min(n0 + n_chunk, m_tokens)
            z, _ = _tile_logits(_gather_rows(hidden, rows, n0, n1), w, b, softcap, inv_temp)
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
    d_weight = torch.zeros_like(weight) if need_weight else None
    d_bias = torch.zeros_like(bias) if need_bias else None
    if m_tokens == 0 or vocab == 0:
        return d_hidden, d_weight, d_bias
    budget = default_workspace_bytes() if workspace_bytes is None else workspace_bytes
    n_chunk, v_chunk = plan_chunks(m_tokens, vocab, dim, budget, dev)
    inv_temp = 1.0 / temperature
    for v0 in range(0, vocab, v_chunk):
        v1 = min(v0 + v_chunk, vocab)
        w = _fp32(weight[v0:v1])
        b = None if bias is None else _fp32(bias[v0:v1])
        # fp32 accumulators for this vocabulary chunk; written to the gradient once all tokens are folded in
        dw_acc = torch.zeros(v1 - v0, dim, device=dev, dtype=torch.float32) if need_weight else None
        db_acc = torch.zeros(v1 - v0, device=dev, dtype=torch.float32) if need_bias else None
        for n0 in range(0, m_tokens, n_chunk):
            n1 = min(n0 + n_chunk, m_tokens)
            h = _gather_rows(hidden, rows, n0, n1)
            z, t = _tile_logits(h, w, b, softcap, inv_temp)
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
                d_hidden[n0:n1].addcmul_(p @ w, g[:, None], value=-1.0)
                d_hidden[n0:n1].addcmul_(w.index_select(0, local), onehot[:, None])
            if need_weight:
                dw_acc.addmm_(p.T, h * g[:, None], alpha=-1.0)
                _add_rows(dw_acc, local, h * onehot[:, None])
            if need_bias:
                db_acc.addmv_(p.T, g, alpha=-1.0)
                _add_rows(db_acc, local, onehot)
        if need_weight:
            d_weight[v0:v1] = dw_acc
        if need_bias:
            d_bias[v0:v1] = db_acc
    return d_hidden, d_weight, d_bias
