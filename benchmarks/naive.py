"""The naive head every method is measured against, and the float64 reference the differences are taken from.

naive: the logits are materialized (``hidden @ weight.T`` in the inputs' dtype), upcast to float32, optionally
soft-capped, ``log_softmax`` over the vocabulary, the label gathered, masked positions zeroed. This is what
TRL's trainers did before their chunked head, and what most training loops still do. Autograd keeps the
(tokens x vocab) softmax for the backward and builds a (tokens x vocab) gradient of the logits.

reference: the same math in float64, in vocabulary chunks so that even a 150k x 5k head needs no float64 copy of
the weight or of its gradient; the weight gradient is compared chunk by chunk (``max_abs_diff_against_reference``).
"""

from __future__ import annotations

import torch

from fastkto import reference

__all__ = ["naive_logprobs", "naive_sequence_logps", "max_abs_diff_against_reference"]


def naive_logprobs(hidden, weight, labels, *, softcap=None, ignore_index=-100, upcast=torch.float32):
    """log_softmax(hidden @ weight.T)[label] through the full logits: ``fastkto.reference.logprobs`` with the matmul
    in the inputs' dtype (``upcast="logits"``), as a trainer that materializes the logits computes it.

    Args:
        hidden: (..., D) float tensor; weight: (V, D) same dtype; labels: (...) integer, ``ignore_index`` masked.
        softcap: z = softcap * tanh(z / softcap) after the upcast (Gemma-2: 30), or None.
        upcast: dtype the logits are cast to before the softmax (float32; float64 for a float64 reference).

    Returns:
        ``upcast`` tensor of labels' shape; exactly 0 where labels == ignore_index.
    """
    return reference.logprobs(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index, dtype=upcast,
                              upcast="logits")


def naive_sequence_logps(hidden, weight, labels, *, softcap=None, ignore_index=-100, upcast=torch.float32):
    """Sum over the last dimension of ``naive_logprobs``: (B, T, D), (V, D), (B, T) -> (B,)."""
    return naive_logprobs(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index, upcast=upcast).sum(-1)


def _ref_chunks(hidden, weight, labels, softcap, vocab_chunk):
    """Float64 logits of each vocabulary chunk: yields (v0, v1, z, dz/da or None), a the chunk's raw logits."""
    h = hidden.double()  # once: the chunks' casts of it are then no-ops
    for v0 in range(0, weight.shape[0], vocab_chunk):
        v1 = min(v0 + vocab_chunk, weight.shape[0])
        z = reference.logits(h, weight[v0:v1], softcap=softcap, dtype=torch.float64)
        # z = c tanh(a / c), so dz/da = 1 - tanh^2 = 1 - (z / c)^2
        yield v0, v1, z, None if softcap is None else 1 - (z / softcap) ** 2


@torch.no_grad()
def max_abs_diff_against_reference(hidden, weight, labels, grad_out, value, grad_hidden, grad_weight, *,
                                   softcap=None, vocab_chunk=4096) -> dict[str, float]:
    """Largest absolute differences of a method's results from the float64 reference, on the same inputs.

    Args:
        hidden (N, D), weight (V, D), labels (N,) with every label valid: the inputs the method saw.
        grad_out: (N,) upstream gradient the method's per-token log-probs were back-propagated with.
        value: (N,) the method's log-probs; grad_hidden (N, D) and grad_weight (V, D): its gradients.

    Returns:
        {"value", "grad_hidden", "grad_weight"}: max |method - reference|, plus "*_scale": max |reference|,
        so that a reader can tell an absolute error from a relative one.
    """
    n = hidden.shape[0]
    # pass 1: log-sum-exp and the target logit in float64
    lse = torch.full((n,), -torch.inf, dtype=torch.float64, device=hidden.device)
    target = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    for v0, v1, z, _ in _ref_chunks(hidden, weight, labels, softcap, vocab_chunk):
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
        inside = (labels >= v0) & (labels < v1)
        target += torch.where(inside, z.gather(1, (labels - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), 0.0)
    ref_value = target - lse
    # pass 2: the gradients, dz = g (onehot - softmax), chained through the soft-cap
    g = grad_out.double()
    ref_dh = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    dw_err = dw_scale = 0.0
    h = hidden.double()
    for v0, v1, z, dz_da in _ref_chunks(hidden, weight, labels, softcap, vocab_chunk):
        dz = -g[:, None] * torch.exp(z - lse[:, None])
        inside = (labels >= v0) & (labels < v1)
        dz[inside, labels[inside] - v0] += g[inside]
        if dz_da is not None:
            dz = dz * dz_da
        ref_dh += dz @ weight[v0:v1].double()
        ref_dw = dz.T @ h
        dw_scale = max(dw_scale, ref_dw.abs().max().item())
        dw_err = max(dw_err, ref_dw.sub_(grad_weight[v0:v1]).abs_().max().item())  # in place: chunks are large
    return {
        "value": (value.double() - ref_value).abs().max().item(),
        "value_scale": ref_value.abs().max().item(),
        "grad_hidden": (grad_hidden.double() - ref_dh).abs().max().item(),
        "grad_hidden_scale": ref_dh.abs().max().item(),
        "grad_weight": dw_err,
        "grad_weight_scale": dw_scale,
    }
