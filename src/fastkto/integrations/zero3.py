"""DeepSpeed ZeRO-3 parameters as fastkto meets them: is a weight partitioned, gather it for a block, or run a
computation as a module's forward so that DeepSpeed's own hooks gather and release it.

A partitioned head weight is used the way DeepSpeed uses it for the model's own head: the log-probabilities are
computed as the head module's forward (``as_module_forward``), so DeepSpeed's module hooks gather the weight for the
forward, release it, gather it again for the backward and reduce-scatter its gradient into this rank's partition.
Nothing here imports deepspeed unless a partitioned tensor is met.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["is_partitioned", "gathered_parameters", "as_module_forward"]


def is_partitioned(t: torch.Tensor | None) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter whose data is not gathered on this rank."""
    status = getattr(t, "ds_status", None)
    return status is not None and getattr(status, "name", str(status)) != "AVAILABLE"


@contextlib.contextmanager
def gathered_parameters(*params: torch.Tensor | None):
    """Gather DeepSpeed ZeRO-3 partitioned parameters for the block (read-only); a no-op for ordinary tensors."""
    todo = list({id(p): p for p in params if is_partitioned(p)}.values())
    if not todo:
        yield
        return
    try:
        import deepspeed
    except ImportError as err:
        raise RuntimeError(
            "the LM head is ZeRO-3 partitioned (it has ds_status) but deepspeed cannot be imported"
        ) from err
    with deepspeed.zero.GatheredParameters(todo, modifier_rank=None):
        yield


def as_module_forward(module: torch.nn.Module, fn, hidden: torch.Tensor) -> torch.Tensor:
    """``fn(hidden)`` run as ``module``'s forward, inside its hooks (DeepSpeed ZeRO-3's gather / release / gradient
    reduce-scatter). The instance's own ``forward`` attribute, if a wrapper set one, is put back afterwards."""
    missing = object()
    own = module.__dict__.get("forward", missing)
    module.forward = fn
    try:
        return module(hidden)
    finally:
        if own is missing:
            del module.forward
        else:
            module.forward = own
