"""KTO's reference point z0 over a whole optimizer step under gradient accumulation.

``KTOLoss(kl_hidden=...)`` estimates z0 from the KL pairs of the micro-batch it is given, as TRL does. With
micro-batches of 1-2 sequences per GPU that estimate is noisy (a mean of a couple of pairs), and each micro-batch
of the same optimizer step uses a different z0. ``KLWindow`` takes one z0 for the step instead: a KL pre-pass over
every micro-batch of the accumulation window (no gradient, nothing saved), one all-reduce of (sum, count), and
that z0 passed to every micro-batch's loss as ``kl=``. The step's gradient is then that of the whole batch
(every rank's micro-batches together) with the whole batch's z0:

    window = KLWindow()
    with torch.no_grad():                                  # pre-pass: KL pairs only
        for mb in micro_batches:
            window.add(policy_kl_logps(mb), mb["kl_ref_logps"])
    z0 = window.z0(process_group=dist.group.WORLD)         # one all-reduce for the whole step
    for mb in micro_batches:
        out = loss_fn(hidden(mb), weight, mb["labels"], mb["desirable"], ref_logps=mb["ref_logps"], kl=z0)
        (out.loss * window.weight(mb_size)).backward()      # mean over the window's sequences on this rank
    opt.step(); opt.zero_grad()

Cost: one more no-grad forward of the KL pairs per micro-batch (the policy's KL pass moves from the loss call to
the pre-pass; it is not run twice), and one all-reduce per optimizer step instead of one per micro-batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import distributed as _dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["KLWindow"]


class KLWindow:
    """Accumulates the KL pairs' (policy - reference) sums of an accumulation window; ``z0`` is KTO's reference
    point over all of them (and over all ranks of a group): max(0, sum of (policy - ref) / number of pairs), the
    value ``kto_kl`` gives for the concatenated pairs. Sums run in float64 (float32 on MPS)."""

    def __init__(self):
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._sequences = 0

    def add(self, policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, sequences: int | None = None) -> None:
        """Adds one micro-batch's KL pairs: (K,) floating policy and reference log-probabilities (detached here).
        ``sequences``: the micro-batch's sequence count for ``weight`` (default K, one KL pair per sequence)."""
        for name, t in (("policy_kl_logps", policy_kl_logps), ("ref_kl_logps", ref_kl_logps)):
            if not isinstance(t, torch.Tensor) or t.ndim != 1 or not t.is_floating_point():
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a 1-D floating tensor, got {got}")
        if ref_kl_logps.shape != policy_kl_logps.shape:
            raise ValueError(f"ref_kl_logps must have policy_kl_logps' shape {tuple(policy_kl_logps.shape)}, got "
                             f"{tuple(ref_kl_logps.shape)}")
        if sequences is not None and (isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 0):
            raise ValueError(f"sequences must be an int >= 0, got {sequences!r}")
        acc = torch.float32 if policy_kl_logps.device.type == "mps" else torch.float64
        with torch.no_grad():
            part = (policy_kl_logps.detach().to(acc) - ref_kl_logps.detach().to(acc)).sum()
        self._sum = part if self._sum is None else self._sum + part
        self._count += policy_kl_logps.shape[0]
        self._sequences += policy_kl_logps.shape[0] if sequences is None else sequences

    @property
    def pairs(self) -> int:
        """KL pairs added on this rank."""
        return self._count

    def weight(self, sequences: int) -> float:
        """The factor that turns a micro-batch's mean loss over ``sequences`` into its share of the mean over all
        the sequences added on this rank: sequences / total (the micro-batches' losses, so scaled, sum to the
        whole window's mean loss)."""
        if self._sequences == 0:
            raise ValueError("KLWindow.weight needs the window's micro-batches added first")
        # a negative factor would flip the micro-batch's gradient, one past the total over-weight it
        if isinstance(sequences, bool) or not isinstance(sequences, int) or not 0 <= sequences <= self._sequences:
            raise ValueError(f"sequences must be an int in [0, {self._sequences}] (the micro-batch's share of the "
                             f"sequences added), got {sequences!r}")
        return sequences / self._sequences

    def z0(self, process_group: ProcessGroup | None = None, *,
           device: torch.device | str | None = None) -> torch.Tensor:
        """0-d float32 z0 over the pairs added (and, with ``process_group``, over every rank's: one all-reduce of
        (sum, count); every rank of the group must call it, a rank with no pair too, passing ``device``)."""
        if self._sum is None:
            if process_group is None:
                raise ValueError("KLWindow.z0 needs at least one KL pair (none was added)")
            acc_sum = torch.zeros((), dtype=torch.float64, device=device)
        else:
            acc_sum = self._sum
        # a fill on the device: torch.tensor would copy from the host and wait for the stream
        stats = torch.stack([acc_sum, torch.full((), float(self._count), dtype=acc_sum.dtype, device=acc_sum.device)])
        if process_group is not None:
            _dist.all_reduce_sum(stats, process_group)
        return (stats[0] / stats[1].clamp(min=1.0)).clamp(min=0.0).float()
