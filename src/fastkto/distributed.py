"""Distributed pieces: vocab-parallel (tensor-parallel) LM heads and sharded (FSDP2 / DTensor) LM-head weights.

Vocab-parallel: each rank of a process group holds a contiguous slice of the vocabulary rows, in rank order.
Each computes its slice's running max, sum of exponentials and (if the label falls in its slice) target logit;
two all-reduces (MAX, then one SUM for both sums) give the global log-sum-exp, as Megatron-LM does. Backward:
each rank's weight gradient is its own slice's; the hidden-state gradient is summed over ranks.

Sharded weights: a DTensor weight (what ``torch.distributed.fsdp.fully_shard`` registers as a parameter when the
module's own forward does not run, or a weight built with ``distribute_tensor``) is all-gathered once per call by
``gather_sharded``; its backward reduce-scatters the gradient to the shards with the mean over the mesh's ranks,
which is what FSDP2 (and DDP) give every other parameter. See ``gather_sharded`` and docs/scale-out.md.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = [
    "labels_fingerprint",
    "vocab_shard_layout",
    "combine_vocab_parallel",
    "all_reduce_sum",
    "gather_sharded",
    "gather_for_call",
    "is_sharded",
]


def labels_fingerprint(labels: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 tensor on labels' device that tells, with high probability, two different label tensors of the
    same size apart (a sum of labels times position-dependent coefficients; no host sync).

    Integer sums are exact and independent of the reduction order, so equal labels give equal fingerprints on any
    device. Coefficients stay under 2^20, so for |labels| < 2^20 no partial sum overflows below 2^23 tokens.
    """
    flat = labels.reshape(-1).long()
    coef = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) * 2654435761 % 1048573 + 1
    return (flat * coef).sum()


def vocab_shard_layout(
    local_vocab: int, dim: int, n_tokens: int, group: dist.ProcessGroup | None,
    device: torch.device | str | None = None, ok: bool = True, labels_hash: torch.Tensor | None = None,
) -> tuple[int, int] | None:
    """(this rank's first vocabulary id, total vocabulary) of a vocab-parallel head.

    One all-gather of five integers per call; it also checks, cheaply, that all ranks agree on the hidden size,
    the token count and (``labels_hash``: ``labels_fingerprint(labels)``) the labels: hidden and labels must be
    replicated over the group, or every rank would combine other tokens' partial sums into a silently wrong
    result. Every rank sees the same table, so on a mismatch every rank raises the same ValueError (none is left
    waiting in a later collective). ``ok=False`` says this rank rejected its own input: the others then raise too,
    and this rank gets None back (to raise its own, more precise error).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs an initialized torch.distributed process group")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([local_vocab, dim, n_tokens, int(ok), 0], dtype=torch.int64, device=device)
    if labels_hash is not None:
        mine[4] = labels_hash.to(device)  # stays on the device: the all-gather below is the only sync
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu().tolist()
    failed = [r for r, row in enumerate(table) if not row[3]]
    if failed:
        if not ok:
            return None
        raise ValueError(f"process_group rank(s) {failed} rejected their inputs to fused_logprobs (see their error)")
    dims = sorted({row[1] for row in table})
    if len(dims) > 1:
        raise ValueError(f"process_group ranks disagree on the hidden size D: {[row[1] for row in table]}")
    counts = sorted({row[2] for row in table})
    if len(counts) > 1:
        raise ValueError(
            f"process_group ranks disagree on the token count: {[row[2] for row in table]}; a vocab-parallel head "
            "needs the same hidden states and labels on every rank"
        )
    if len({row[4] for row in table}) > 1:
        raise ValueError(
            "process_group ranks pass different labels (same count, different values or order); a vocab-parallel "
            "head needs the same hidden states and labels on every rank"
        )
    offset = sum(row[0] for row in table[:rank])
    return offset, sum(row[0] for row in table)


def combine_vocab_parallel(row_max, sum_exp, target, *extra, group):
    """Merge per-shard (max, sum of exp, target logit) into global ones: all-reduce MAX, then one SUM. ``extra``:
    the token statistics' partials (``kernels.stats``: a; or a, q, u and the arg-max as a row of the whole
    vocabulary), rescaled to the global max like the sum of exp and summed in the same all-reduce; the arg-max is
    the lowest among the shards that hold the global max (one MIN all-reduce)."""
    from .kernels import stats as st

    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # a shard with no vocabulary rows has max -inf and sum 0; keep it at 0 instead of exp(-inf - -inf) = nan
    scaled = st.rescale((row_max, sum_exp, target, *extra), global_max)
    summed = scaled[:5] if len(scaled) > 3 else scaled
    sums = torch.stack(list(summed))
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    out = [global_max, *sums.unbind(0)]
    if len(extra) > 1:
        arg = torch.where(row_max == global_max, extra[3], math.inf)
        dist.all_reduce(arg, op=dist.ReduceOp.MIN, group=group)
        out.append(arg)
    return tuple(out)


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` in place over the ranks of ``group``; returns it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ----------------------------------------------------------------------------------------------------------------
# Sharded (DTensor) weights


def _dtensor_api():
    """(DTensor, Replicate, Partial) or None where torch has no DTensor (no distributed build)."""
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:  # torch < 2.5 keeps them private
        try:
            from torch.distributed._tensor import DTensor, Partial, Replicate
        except ImportError:
            return None
    return DTensor, Replicate, Partial


def is_sharded(tensor) -> bool:
    """True for a DTensor (an FSDP2-sharded or tensor-parallel parameter), which ``gather_sharded`` gathers."""
    api = _dtensor_api()
    return api is not None and isinstance(tensor, api[0])


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (the 1/n of a mean taken as a sum of pre-divided
    terms, which also keeps a bf16 / fp16 sum from overflowing, as FSDP2's pre-divide does)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _replicate(tensor):
    """The full value of a DTensor as a plain local tensor whose gradient reaches the DTensor as the mean, over
    the mesh's ranks, of each rank's gradient."""
    _, Replicate, Partial = _dtensor_api()
    mesh = tensor.device_mesh
    full = tensor.redistribute(mesh, [Replicate()] * mesh.ndim)
    # Partial: each rank's gradient of the full tensor is one term of a sum over the mesh; the redistribute's
    # backward then reduce-scatters it (Shard dims) or all-reduces it (Replicate dims) back to the placements.
    local = full.to_local(grad_placements=[Partial()] * mesh.ndim)
    if local.requires_grad and mesh.size() > 1:
        local = _ScaleGrad.apply(local, 1.0 / mesh.size())
    return local


def gather_sharded(weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   process_group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain tensors pass through; a DTensor weight (or bias) is all-gathered into a plain full tensor.

    ``fused_logprobs`` calls this once per call, before any chunking: one all-gather of the weight (and one of the
    bias) per call, never per chunk, and one reduce-scatter of each in backward.

    Gradient: the gathered tensor's gradient reaches the DTensor as the MEAN over all ranks of its device mesh of
    each rank's gradient (reduce-scatter on Shard dims, all-reduce on Replicate dims, terms pre-divided by the
    mesh size). That is exactly what FSDP2 gives a parameter by default (and what DDP gives a replicated one):
    with a data-parallel mesh, rank r's loss L_r (a mean over its local batch) yields (1/n) sum_r dL_r/dW, the
    gradient of the mean over the global batch when the local batches are equal. On a mesh dimension whose ranks
    hold the same data (tensor parallel), every rank's gradient is the same and their mean is that gradient, so
    the mean is right there too; a sum would multiply the step by the mesh size. (If you changed FSDP2's divide
    factor, e.g. ``set_gradient_divide_factor(1.0)``, scale the loss to match.)

    Memory: the gathered full tensor is new memory (V x D in the weight's dtype) that lives as long as something
    references it. Passed a DTensor, ``fused_logprobs`` frees it when it returns, with or without gradients, and
    gathers it again in backward (``gather_for_call``), as FSDP2 does for a unit resharded after forward. Calling
    ``gather_sharded`` yourself and passing the plain result to several calls (policy and KL passes) gathers once
    for all of them, same gradients, but autograd then keeps the full tensor from the first gradient pass until
    its backward has run (DTensor's redistribute / to_local nodes save no tensors; the log-prob function does).

    Args:
        weight: (V, D) tensor or DTensor (any mesh, any placements, e.g. FSDP2's Shard(0)).
        bias: (V,) tensor, DTensor or None.
        process_group: the vocab-parallel group passed to ``fused_logprobs``, if any. A DTensor weight cannot be
            combined with it (gathering would hand every rank the whole vocabulary as its "slice"): pass
            ``weight.to_local()``, this rank's slice, instead.

    Returns:
        (weight, bias) as plain tensors (bias None when None).
    """
    if not (is_sharded(weight) or is_sharded(bias)):
        return weight, bias
    if process_group is not None:
        raise TypeError(
            "weight (or bias) is a DTensor and process_group is set: for a vocab-parallel head pass this rank's "
            "contiguous vocabulary slice as a plain tensor (e.g. weight.to_local()), or drop process_group to "
            "gather the sharded weight"
        )
    return (_replicate(weight) if is_sharded(weight) else weight), (_replicate(bias) if is_sharded(bias) else bias)


def gather_for_call(weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    process_group: dist.ProcessGroup | None = None):
    """``gather_sharded`` for one ``fused_logprobs`` call, plus a way to gather the same tensors again in backward.

    Returns ``(weight, bias, regather)``. ``regather`` is None when neither tensor is a DTensor. Otherwise it is a
    callable, run inside backward, that all-gathers the sharded ones again without autograd and returns
    ``(weight or None, bias or None)`` (None for a tensor that was not sharded; ``regather.sharded`` says which
    were). The log-prob function does not save a gathered tensor, so the full V x D weight exists only while the
    call's forward runs and while its backward runs, not in between (while other passes or the rest of the model
    run). That costs one more all-gather per sharded tensor in backward; the gradient still reaches the shards
    through ``gather_sharded``'s autograd path. The callable keeps only detached views of this rank's shards
    (the parameter's storage, or the cast copy's when the caller passed ``weight.to(torch.bfloat16)``: 1 / world
    of the full tensor).
    """
    full_w, full_b = gather_sharded(weight, bias, process_group=process_group)
    if not (is_sharded(weight) or is_sharded(bias)):
        return full_w, full_b, None
    return full_w, full_b, _Regather(weight, bias)


class _Regather:
    """Gathers a call's sharded weight and / or bias again, without autograd (see ``gather_for_call``)."""

    def __init__(self, weight, bias):
        self.shards = [t.detach() if is_sharded(t) else None for t in (weight, bias)]
        self.sharded = tuple(t is not None for t in self.shards)

    def __call__(self):
        # every rank runs this backward, in the same order, so the all-gathers pair up like the forward's
        with torch.no_grad():
            return tuple(None if t is None else t.full_tensor() for t in self.shards)
