"""Token statistics carried by the forward's online log-sum-exp, and how partial statistics combine.

Besides each token's log-probability, TRL's trainers log four per-token fields of the whole distribution
p = softmax(z) (z the transformed logits: bias, soft-cap, temperature); the forward computes them in the same
pass over the vocabulary as the log-sum-exp, from running sums kept beside the running max m and
s = sum_j exp(z_j - m):

    a = sum_j exp(z_j - m) (z_j - m)     <= 0, a sum of terms of one sign (no cancellation)
    q = sum_j exp(2 (z_j - m))
    u = sum_j z_j
    r = the first j with z_j = max z     (torch.argmax's tie rule: the lowest index among equal maxima)

and from them, with lse = m + log s:

    entropy          = -sum_j p_j log p_j = log s - a / s          (two terms >= 0)
    mean_logits      = u / V
    is_top1          = (r == label)
    log_sum_sq_probs = log sum_j p_j^2 = log q - 2 log s

Levels (which partials a pass carries, so that a plain log-prob pass carries none): 0 = (m, s, target logit),
1 = also a (entropy), 2 = also q, u, r (every field). A partial set is a tuple of (M,) float32 tensors in that
order; r is a vocabulary index of the whole weight (shard) held in float32 (exact below 2^24 rows).

Combining partials of disjoint vocabulary ranges (the Triton forward's splits, the CPU's worker shards, the ranks
of a vocab-parallel head) rescales each to the common max M with alpha_k = exp(m_k - M):

    s = sum_k alpha_k s_k      a = sum_k alpha_k (a_k + (m_k - M) s_k)      q = sum_k alpha_k^2 q_k
    u = sum_k u_k              r = the lowest r_k among the parts with m_k = M

The combine is element-wise per token in a fixed order of the parts, so a token's result never depends on the
other tokens of the call (batch invariance).
"""

from __future__ import annotations

import math

import torch

__all__ = ["FIELDS", "level_for", "n_partials", "merge", "rescale", "finish"]

FIELDS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
_PARTIALS = {0: 3, 1: 4, 2: 7}
# exact integers in float32: the arg-max index is kept as a float32 statistic
MAX_ARG_VOCAB = 1 << 24


def level_for(fields) -> int:
    """The partials level that computes ``fields`` (names from ``FIELDS``; "log_probs" needs none)."""
    wanted = set(fields) - {"log_probs"}
    unknown = wanted - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown token statistics {sorted(unknown)}; expected names from {('log_probs',) + FIELDS}")
    if not wanted:
        return 0
    return 1 if wanted == {"entropy"} else 2


def n_partials(level: int) -> int:
    if level not in _PARTIALS:
        raise ValueError(f"stats level must be 0, 1 or 2, got {level!r}")
    return _PARTIALS[level]


def rescale(part: tuple, new_max: torch.Tensor) -> tuple:
    """``part`` expressed at running max ``new_max`` (>= its own max): (alpha s, t, alpha (a + (m - M) s),
    alpha^2 q, u, r); a part without vocabulary rows (m = -inf, s = 0) becomes zeros."""
    m, s, t, *extra = part
    alpha = torch.where(torch.isneginf(m), 0.0, torch.exp(m - new_max))
    out = [s * alpha, t]
    if extra:
        shift = torch.where(s > 0, (m - new_max) * s, 0.0)
        out.append(alpha * (extra[0] + shift))
    if len(extra) > 1:
        out += [extra[1] * (alpha * alpha), extra[2], extra[3]]
    return tuple(out)


def merge(parts: list[tuple]) -> tuple:
    """One partial set from those of disjoint vocabulary ranges, listed in vocabulary order (see the module
    docstring); element-wise per token, in list order, one part at a time (temporaries of a few (M,) vectors)."""
    if len(parts) == 1:
        return tuple(parts[0])
    new_max = parts[0][0]
    for p in parts[1:]:
        new_max = torch.maximum(new_max, p[0])
    totals = list(rescale(parts[0], new_max))
    found = parts[0][0] == new_max  # the arg-max comes from the first part (lowest indices) holding the maximum
    for p in parts[1:]:
        for k, value in enumerate(rescale(p, new_max)):
            if k == 5:
                take = ~found & (p[0] == new_max)
                totals[5] = torch.where(take, value, totals[5])
                found = found | take
            else:
                totals[k] = totals[k] + value
    return (new_max, *totals)


def finish(part: tuple, labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(log-probs (M,), lse (M,), {field: (M,)}) from a whole-vocabulary partial set; ``labels`` (M,) int64 as
    indices of the whole vocabulary (for is_top1), ``vocab`` the whole vocabulary's size (for mean_logits)."""
    m, s, t, *extra = part
    log_s = torch.log(s)
    lse = m + log_s
    fields = {}
    if extra:
        fields["entropy"] = log_s - extra[0] / s
    if len(extra) > 1:
        fields["mean_logits"] = extra[2] / float(max(vocab, 1))
        fields["is_top1"] = extra[3] == labels.to(torch.float32)
        fields["log_sum_sq_probs"] = torch.log(extra[1]) - 2.0 * log_s
    return t - lse, lse, fields


def empty(m: int, level: int, device) -> tuple:
    """The partials of an empty vocabulary range: m = -inf, sums 0, arg-max +inf (never the first maximum)."""
    out = [torch.full((m,), -math.inf, device=device), torch.zeros(m, device=device), torch.zeros(m, device=device)]
    if level >= 1:
        out.append(torch.zeros(m, device=device))
    if level >= 2:
        out += [torch.zeros(m, device=device), torch.zeros(m, device=device), torch.full((m,), math.inf, device=device)]
    return tuple(out)
