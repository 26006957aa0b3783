"""The head fastkto replaces, written once: materialize the logits, ``log_softmax`` over the vocabulary, gather.

This is what ``fastkto.fused_logprobs`` computes without ever building the (..., V) logits, computed by building
them. It serves three roles, one function each:

* the **reference** of the tests: ``logprobs(..., dtype=torch.float64)`` (the default), differentiable, so
  autograd of it gives the reference gradients (call it on float64 leaf copies);
* the **naive baseline** of the benchmarks and examples: ``logprobs(..., dtype=torch.float32, upcast="logits")``
  is what a trainer that materializes the logits does (the matmul in the inputs' dtype, then a float32 copy);
* the **logit transform** of every caller outside the kernels: ``transform_logits`` applies ``LOGIT_TRANSFORMS``
  (bias, soft-cap, temperature, in that order) to logits ``a = hidden @ weight.T`` already computed.

It holds (..., V) logits in ``dtype`` and their softmax for the backward: small inputs only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

__all__ = ["LOGIT_TRANSFORMS", "transform_logits", "logits", "label_logprobs", "logprobs", "sequence_logps"]

#: The logit transform, in the order it is applied: (argument, formula, step). ``step(z, value)`` takes the logits
#: so far and the argument's value; an argument at its neutral value (None, or temperature 1.0) skips its step.
#: Model configs map onto these arguments in ``fastkto.integrations.transformers`` (its docstring's table); the
#: kernels apply the same formulas in-tile.
LOGIT_TRANSFORMS: tuple[tuple[str, str, Callable[[torch.Tensor, Any], torch.Tensor]], ...] = (
    ("bias", "z = a + b", lambda z, b: z + b.to(z.dtype)),
    ("softcap", "z = c tanh(z / c)", lambda z, c: c * torch.tanh(z / c)),
    ("temperature", "z = z / T", lambda z, t: z / t),
)


def transform_logits(a: torch.Tensor, *, bias: torch.Tensor | None = None, softcap: float | None = None,
                     temperature: float = 1.0) -> torch.Tensor:
    """The model's logits z from the raw head output ``a = hidden @ weight.T``: ``LOGIT_TRANSFORMS`` in order.

    Args:
        a: (..., V) floating tensor; the result has its dtype (``bias`` (V,) is cast to it).
        bias, softcap, temperature: as ``fastkto.fused_logprobs`` takes them; None / 1.0 skip their step.

    Returns:
        (..., V) tensor, differentiable in ``a`` and ``bias``.
    """
    values = {"bias": bias, "softcap": softcap, "temperature": None if temperature == 1.0 else temperature}
    z = a
    for name, _, step in LOGIT_TRANSFORMS:
        if values[name] is not None:
            z = step(z, values[name])
    return z


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           softcap: float | None = None, temperature: float = 1.0, dtype: torch.dtype = torch.float64,
           upcast: Literal["inputs", "logits"] = "inputs") -> torch.Tensor:
    """The materialized, transformed logits ``transform(hidden @ weight.T + bias)``.

    Args:
        hidden: (..., D) floating tensor; weight: (V, D); bias: (V,) or None.
        softcap, temperature: see ``transform_logits``.
        dtype: dtype of the result and of the transform.
        upcast: "inputs" casts hidden, weight and bias to ``dtype`` before the matmul (a reference: the product is
            exact to ``dtype``); "logits" multiplies in the inputs' dtype (adding the bias there, as ``nn.Linear``
            does) and casts the product (what a model's head and a naive trainer compute).

    Returns:
        (..., V) tensor of ``dtype``, differentiable in hidden, weight and bias.
    """
    if upcast == "inputs":
        a = hidden.to(dtype) @ weight.to(dtype).T
    elif upcast == "logits":
        a = hidden @ weight.T
        if bias is not None:
            a, bias = a + bias, None
        a = a.to(dtype)
    else:
        raise ValueError(f'upcast must be "inputs" or "logits", got {upcast!r}')
    return transform_logits(a, bias=bias, softcap=softcap, temperature=temperature)


def label_logprobs(z: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """``log_softmax(z)[label]`` of logits already materialized (a model's ``.logits``, or ``logits(...)``).

    Args:
        z: (..., V) floating logits; labels: (...) integer, ``ignore_index`` on unscored positions.

    Returns:
        labels' shape, z's dtype; exactly 0 where labels == ignore_index.
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    picked = torch.log_softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)  # a scalar: no (...)-sized zeros beside the result


def logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
             softcap: float | None = None, temperature: float = 1.0, ignore_index: int = -100,
             dtype: torch.dtype = torch.float64, upcast: Literal["inputs", "logits"] = "inputs") -> torch.Tensor:
    """Per-token ``log_softmax(z)[label]`` through the full logits: ``fastkto.fused_logprobs``'s contract, naively.

    Args:
        hidden: (..., D); weight: (V, D); labels: (...) integer, ``ignore_index`` masked; bias: (V,) or None.
        softcap, temperature, dtype, upcast: see ``logits``.

    Returns:
        labels' shape, ``dtype``; exactly 0 where labels == ignore_index.
    """
    z = logits(hidden, weight, bias, softcap=softcap, temperature=temperature, dtype=dtype, upcast=upcast)
    return label_logprobs(z, labels, ignore_index=ignore_index)


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, average: bool = False,
                   ignore_index: int = -100, **kwargs) -> torch.Tensor:
    """Per-sequence sums (``average=True``: means over the valid tokens) of ``logprobs`` over the last dimension.

    ``hidden`` (B, T, D), ``weight`` (V, D), ``labels`` (B, T) -> (B,) in ``dtype``; ``kwargs`` go to ``logprobs``.
    """
    total = logprobs(hidden, weight, labels, ignore_index=ignore_index, **kwargs).sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp(min=1)
    return total
