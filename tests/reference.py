"""Float64 references that materialize the logits: what every fastkto path is checked against."""

from __future__ import annotations

import torch


def reference_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None):
    """log_softmax(z)[label] in float64 through the full logits; 0 where label == ignore_index.

    Differentiable: call it on float64 leaf copies to get reference gradients from autograd.
    """
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    valid = labels != ignore_index
    picked = torch.log_softmax(z, dim=-1).gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def reference_sequence_logps(hidden, weight, labels, *, average=False, ignore_index=-100, **kw):
    per_token = reference_logprobs(hidden, weight, labels, ignore_index=ignore_index, **kw)
    total = per_token.sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp(min=1)
    return total


def leaf64(t):
    """A float64 leaf copy of t that requires grad (None stays None)."""
    return None if t is None else t.detach().double().requires_grad_(True)
