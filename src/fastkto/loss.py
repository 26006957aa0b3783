"""KTO and DPO losses on per-sequence log-probabilities: the math layer, and the table of loss types.

Two layers, each usable alone:

* this module: ``kto_loss``, ``kto_kl``, ``dpo_loss`` take ``(B,)`` per-sequence log-probabilities from anywhere (a
  model's logits, a precomputed reference column of a dataset, ``fastkto.sequence_logps``) and return a small
  dataclass holding the differentiable loss and detached training metrics.
* ``fastkto.modules``: ``KTOLoss`` and ``DPOLoss`` take final hidden states and the LM-head weight and obtain every
  log-probability through ``fastkto.sequence_logps``, so no (tokens x vocabulary) logits are built. They are also
  importable from here (``fastkto.loss.KTOLoss``), as before the split.

Notation: for a sequence y, r(y) = log pi_theta(y|x) - log pi_ref(y|x) (sums over completion tokens, or means
with ``average_log_prob=True``), sigma the logistic function, log sigma computed stably.

KTO (Ethayarajh et al. 2024, Eq. 7), z0 a detached estimate of KL(pi_theta || pi_ref):

    kto:                desirable   1 - sigma(beta (r - z0))        undesirable   1 - sigma(beta (z0 - r))
    apo_zero_unpaired:  desirable   1 - sigma(beta r)               undesirable   sigma(beta r)
    loss = mean over the batch of  w(y) * per-example loss,  w = desirable_weight or undesirable_weight.

DPO: one small function per loss type in ``DPO_LOSSES``, its per-pair formula in its docstring (``dpo_loss``'s
docstring lists them all). A new variant is one function and one row there, plus its formula in
tests/test_loss.py's ``dpo_formula`` (the tests iterate the table).

Values match TRL 1.16's ``KTOTrainer`` / ``DPOTrainer`` for the same log-probabilities (tests/test_loss.py calls
TRL's own loss code); the differences are listed where they occur (``sigmoid`` label smoothing, ``bco_pair``'s
reward shift, the cross-rank mean of z0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import distributed as _dist
from ._checks import check_choice, check_nonnegative, check_positive, check_process_group, is_number

if TYPE_CHECKING:  # re-exported at run time by __getattr__ below (fastkto.modules imports this module)
    from torch.distributed import ProcessGroup

    from .modules import DPOLoss, KTOLoss

__all__ = [
    "KTO_LOSSES",
    "DPO_LOSSES",
    "KTO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "KTOOutput",
    "DPOOutput",
    "kto_loss",
    "kto_kl",
    "dpo_loss",
    "suggest_kto_weights",
    "KTOLoss",
    "DPOLoss",
]


# ----------------------------------------------------------------------------------------------------------------
# the loss types


@dataclass(frozen=True)
class DPOConstants:
    """The scalars a DPO formula may read: beta, eps = label_smoothing, tau = discopop_tau, delta = bco_delta (a float
    or a detached 0-d tensor)."""

    beta: float
    eps: float = 0.0
    tau: float = 0.05
    delta: float | torch.Tensor = 0.0


@dataclass(frozen=True)
class DPOLossType:
    """One row of ``DPO_LOSSES``.

    Attributes:
        per_pair: ``(chosen_ratio, rejected_ratio, constants) -> (P,) losses``, the ratios r_c, r_r (P,) of policy
            minus reference log-probs; its docstring is the formula ``dpo_loss`` documents.
        label_smoothing: "no" (a non-zero label_smoothing is refused, not ignored), "optional" or "required" (> 0).
        uses_bco_delta: reads ``constants.delta`` (a non-zero bco_delta is refused by the other types).
        averages_log_probs: ``DPOLoss(average_log_prob=None)`` length-averages the log-probs for this type (IPO).
    """

    per_pair: Callable[[torch.Tensor, torch.Tensor, DPOConstants], torch.Tensor]
    label_smoothing: str = "no"
    uses_bco_delta: bool = False
    averages_log_probs: bool = False


def _dpo_sigmoid(rc, rr, k):
    """-(1 - eps) log sigma(x) - eps log sigma(-x)        (DPO; eps > 0: conservative DPO)"""
    x = k.beta * (rc - rr)
    return -(1 - k.eps) * F.logsigmoid(x) - k.eps * F.logsigmoid(-x) if k.eps else -F.logsigmoid(x)


def _dpo_hinge(rc, rr, k):
    """max(0, 1 - x)                                       (SLiC)"""
    return torch.relu(1 - k.beta * (rc - rr))


def _dpo_ipo(rc, rr, k):
    """(h - 1 / (2 beta))^2                                (IPO Eq. 17: pass length-averaged log-probs;
                                                            ``DPOLoss`` averages for this type)"""
    return ((rc - rr) - 1 / (2 * k.beta)) ** 2


def _dpo_robust(rc, rr, k):
    """(-(1 - eps) log sigma(x) + eps log sigma(-x)) / (1 - 2 eps)      (rDPO)"""
    x = k.beta * (rc - rr)
    return (-(1 - k.eps) * F.logsigmoid(x) + k.eps * F.logsigmoid(-x)) / (1 - 2 * k.eps)


def _dpo_exo_pair(rc, rr, k):
    """sigma(x) (log sigma(x) - log(1 - eps)) + sigma(-x) (log sigma(-x) - log eps),  eps > 0  (EXO)"""
    # KL(q || p) over {chosen, rejected}: q = (sigma(x), sigma(-x)) the model's, p = (1 - eps, eps) the labels'
    x = k.beta * (rc - rr)
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-k.eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(k.eps)
    )


def _dpo_bco_pair(rc, rr, k):
    """-log sigma(beta r_c - delta) - log sigma(-(beta r_r - delta)),  delta = bco_delta      (BCO)"""
    return -F.logsigmoid(k.beta * rc - k.delta) - F.logsigmoid(-(k.beta * rr - k.delta))


def _dpo_sppo_hard(rc, rr, k):
    """(r_c - 1 / (2 beta))^2 + (r_r + 1 / (2 beta))^2                                       (SPPO)"""
    return (rc - 1 / (2 * k.beta)) ** 2 + (rr + 1 / (2 * k.beta)) ** 2


def _dpo_nca_pair(rc, rr, k):
    """-log sigma(beta r_c) - 1/2 log sigma(-beta r_c) - 1/2 log sigma(-beta r_r)            (NCA)"""
    c, r = k.beta * rc, k.beta * rr
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _dpo_apo_zero(rc, rr, k):
    """1 - sigma(beta r_c) + sigma(beta r_r)                                                 (APO)"""
    return torch.sigmoid(-k.beta * rc) + torch.sigmoid(k.beta * rr)


def _dpo_apo_down(rc, rr, k):
    """sigma(beta r_c) + 1 - sigma(x)                                                        (APO)"""
    return torch.sigmoid(k.beta * rc) + torch.sigmoid(-k.beta * (rc - rr))


def _dpo_discopop(rc, rr, k):
    """(1 - m) (-log sigma(x)) + m exp(-x),  m = sigma(x / tau),  tau = discopop_tau         (DiscoPOP)"""
    x = k.beta * (rc - rr)
    mix = torch.sigmoid(x / k.tau)
    return (1 - mix) * -F.logsigmoid(x) + mix * torch.exp(-x)


# x = beta h, h = r_c - r_r; every formula is TRL 1.16's for the same log-probabilities (see ``dpo_loss``)
DPO_LOSSES: dict[str, DPOLossType] = {
    "sigmoid": DPOLossType(_dpo_sigmoid, label_smoothing="optional"),
    "hinge": DPOLossType(_dpo_hinge),
    "ipo": DPOLossType(_dpo_ipo, averages_log_probs=True),
    "robust": DPOLossType(_dpo_robust, label_smoothing="optional"),
    "exo_pair": DPOLossType(_dpo_exo_pair, label_smoothing="required"),
    "bco_pair": DPOLossType(_dpo_bco_pair, uses_bco_delta=True),
    "sppo_hard": DPOLossType(_dpo_sppo_hard),
    "nca_pair": DPOLossType(_dpo_nca_pair),
    "apo_zero": DPOLossType(_dpo_apo_zero),
    "apo_down": DPOLossType(_dpo_apo_down),
    "discopop": DPOLossType(_dpo_discopop),
}
DPO_LOSS_TYPES = tuple(DPO_LOSSES)
# the DPO types whose formula reads label_smoothing; any other type rejects a non-zero value instead of ignoring it
_SMOOTHED_DPO_TYPES = tuple(name for name, row in DPO_LOSSES.items() if row.label_smoothing != "no")


@dataclass(frozen=True)
class KTOLossType:
    """One row of ``KTO_LOSSES``: ``uses_kl`` says whether the type reads z0 (and so needs ``kl`` or the KL pairs:
    without it z0 = 0 and a given ``kl`` is refused). Both KTO types share one per-example formula."""

    uses_kl: bool


KTO_LOSSES: dict[str, KTOLossType] = {
    "kto": KTOLossType(uses_kl=True),  # the paper's loss, z0 from mismatched pairs (``kto_kl``)
    "apo_zero_unpaired": KTOLossType(uses_kl=False),  # the kto formula with z0 = 0
}
KTO_LOSS_TYPES = tuple(KTO_LOSSES)


# ----------------------------------------------------------------------------------------------------------------
# outputs


def _floats(named: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: float} with one device-to-host copy for all of them."""
    values = torch.stack([t.detach().to(torch.float64).reshape(()) for t in named.values()]).tolist()
    return dict(zip(named, values))


@dataclass
class KTOOutput:
    """What ``kto_loss`` / ``KTOLoss`` return. ``B`` is the batch size; everything but ``loss`` is detached.

    Attributes:
        loss: 0-d, differentiable: the mean over the batch of the weighted per-example losses.
        losses: (B,) weighted per-example losses.
        rewards: (B,) implicit rewards beta * (policy_logps - ref_logps) (without z0, as TRL logs them).
        kl: 0-d, the z0 the loss used (0 for "apo_zero_unpaired", or when ``kl=0.0`` was passed).
        policy_logps, ref_logps: (B,) the per-sequence log-probabilities the loss saw.
        desirable: (B,) bool labels.
        n_desirable, n_undesirable: 0-d int64 counts.
        desirable_reward_mean, undesirable_reward_mean: 0-d mean rewards of each class (NaN for an empty class).
        desirable_logps_mean, undesirable_logps_mean: 0-d mean policy log-probs of each class (NaN when empty).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    desirable: torch.Tensor
    n_desirable: torch.Tensor
    n_undesirable: torch.Tensor
    desirable_reward_mean: torch.Tensor
    undesirable_reward_mean: torch.Tensor
    desirable_logps_mean: torch.Tensor
    undesirable_logps_mean: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Python floats under TRL's log names (one device sync). The means of a class absent from the batch are
        left out, and ``rewards/margins`` needs both classes."""
        out = _floats({
            "loss": self.loss, "kl": self.kl,
            "rewards/chosen": self.desirable_reward_mean, "rewards/rejected": self.undesirable_reward_mean,
            "logps/chosen": self.desirable_logps_mean, "logps/rejected": self.undesirable_logps_mean,
            "count/desirable": self.n_desirable, "count/undesirable": self.n_undesirable,
        })
        out["count/desirable"], out["count/undesirable"] = int(out["count/desirable"]), int(out["count/undesirable"])
        if out["count/desirable"] == 0:
            del out["rewards/chosen"], out["logps/chosen"]
        if out["count/undesirable"] == 0:
            del out["rewards/rejected"], out["logps/rejected"]
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


@dataclass
class DPOOutput:
    """What ``dpo_loss`` / ``DPOLoss`` return. ``P`` is the number of pairs; everything but ``loss`` is detached.

    Attributes:
        loss: 0-d, differentiable: the mean over pairs of the per-pair losses.
        losses: (P,) per-pair losses.
        chosen_rewards, rejected_rewards: (P,) beta * (policy - reference) log-probs of each side.
        margins: (P,) chosen_rewards - rejected_rewards.
        accuracy: 0-d, the fraction of pairs with chosen_rewards > rejected_rewards.
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (P,) the inputs.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Python floats under TRL's log names: batch means (one device sync)."""
        return _floats({
            "loss": self.loss, "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(), "rewards/accuracies": self.accuracy,
            "rewards/margins": self.margins.mean(), "logps/chosen": self.policy_chosen_logps.mean(),
            "logps/rejected": self.policy_rejected_logps.mean(),
        })


# ----------------------------------------------------------------------------------------------------------------
# argument checks


def _check_logps(name: str, t, size: int | None = None, like: tuple[str, torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """A floating (n,) tensor; with ``size``, n must equal it; with ``like`` = (its name, a tensor), on its device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of per-sequence log-probabilities, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
    if size is not None and t.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},) like the other per-sequence inputs, got {tuple(t.shape)}")
    if like is not None and isinstance(like[1], torch.Tensor) and t.device != like[1].device:
        raise ValueError(f"{name} is on {t.device} but {like[0]} is on {like[1].device}: move it there "
                         f"({name}.to({str(like[1].device)!r}))")
    return t


def _batch_size(name: str, t, unit: str) -> int:
    """The length of the first per-sequence input ``t`` (checked as ``_check_logps``), which may not be empty."""
    n = _check_logps(name, t).shape[0]
    if n == 0:
        raise ValueError(f"{name} is empty: the batch must hold at least one {unit}")
    return n


def _check_desirable(desirable, n: int, device: torch.device, other: str) -> None:
    """``desirable``: a (n,) bool tensor on ``device``, the device of the input named ``other``."""
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable must be a bool torch.Tensor of shape ({n},), got {type(desirable).__name__}")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor (True = desirable), got {desirable.dtype}")
    if tuple(desirable.shape) != (n,):
        raise ValueError(f"desirable must have shape ({n},), one label per sequence, got {tuple(desirable.shape)}")
    if desirable.device != device:
        raise ValueError(
            f"desirable is on {desirable.device} but {other} is on {device}: move it there "
            f"(desirable.to({str(device)!r}))"
        )


def _check_dpo_hyper(beta, loss_type, label_smoothing, discopop_tau) -> None:
    check_positive("beta", beta)
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    if not is_number(label_smoothing):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    smoothing = DPO_LOSSES[loss_type].label_smoothing
    if label_smoothing and smoothing == "no":
        raise ValueError(
            f"label_smoothing is used only by loss_type in {_SMOOTHED_DPO_TYPES}; loss_type={loss_type!r} "
            f"would ignore label_smoothing={label_smoothing}"
        )
    if smoothing == "required" and label_smoothing == 0:
        raise ValueError(f"loss_type={loss_type!r} needs label_smoothing > 0 (log of it is taken; the EXO paper uses "
                         f"1e-3)")
    check_positive("discopop_tau", discopop_tau)


def _check_kto_hyper(beta, desirable_weight, undesirable_weight, loss_type) -> None:
    check_positive("beta", beta)
    check_nonnegative("desirable_weight", desirable_weight)
    check_nonnegative("undesirable_weight", undesirable_weight)
    if not torch.compiler.is_compiling() and desirable_weight == undesirable_weight == 0:
        raise ValueError("desirable_weight and undesirable_weight cannot both be 0: the loss would be 0 for every "
                         "batch, with no gradient (set the class you want trained to a weight > 0)")
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)


# ----------------------------------------------------------------------------------------------------------------
# layer 1: the math on (B,) log-probabilities


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
           process_group: ProcessGroup | None = None) -> torch.Tensor:
    """z0: KTO's reference point, a detached estimate of KL(pi_theta || pi_ref) from mismatched pairs.

    The KL pairs are completions scored under prompts they do not answer (e.g. prompt i with completion i+1),
    so that the estimate does not favour the batch's own answers. z0 = max(0, mean_k (policy_k - ref_k)).

    Args:
        policy_kl_logps: (K,) floating: policy log-probabilities of the K KL pairs on this rank (K may be 0 when
            ``process_group`` is given).
        ref_kl_logps: (K,) floating: the reference's log-probabilities of the same pairs.
        process_group: a torch.distributed group (or ``torch.distributed.group.WORLD``): the mean then runs over
            the pairs of every rank, with one all-reduce of (sum, count), so ranks holding different numbers of
            pairs are weighted by their counts. TRL 1.16 instead averages the per-rank means (the same value when
            all ranks hold the same K). All ranks of the group must call it.

    Returns:
        0-d tensor in the inputs' (promoted) dtype, clamped at 0, detached (no gradient flows into the inputs).
        With a group and no pair on any rank it is 0.
    """
    _check_logps("policy_kl_logps", policy_kl_logps)
    _check_logps("ref_kl_logps", ref_kl_logps, policy_kl_logps.shape[0], ("policy_kl_logps", policy_kl_logps))
    check_process_group("process_group", process_group)
    if process_group is None and policy_kl_logps.shape[0] == 0:
        raise ValueError("kto_kl needs at least one KL pair (policy_kl_logps has shape (0,))")
    with torch.no_grad():
        diff = policy_kl_logps.detach() - ref_kl_logps.detach()
        # sum in float64 (float32 on MPS, which has no float64) so that large batches lose nothing before dividing
        acc = torch.float32 if diff.device.type == "mps" else torch.float64
        # torch.full, not torch.tensor: a host value copied to a GPU waits for its stream (a host sync)
        stats = torch.stack([diff.sum(dtype=acc), torch.full((), float(diff.shape[0]), dtype=acc, device=diff.device)])
        if process_group is not None:
            _dist.all_reduce_sum(stats, process_group)
        z0 = (stats[0] / stats[1].clamp(min=1.0)).clamp(min=0.0)
    return z0.to(diff.dtype)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl: float | torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> KTOOutput:
    """The KTO loss (Ethayarajh et al. 2024, Eq. 7) on per-sequence log-probabilities.

    With r = policy_logps - ref_logps and z0 = ``kl``:

        loss_type="kto":                desirable   1 - sigma(beta (r - z0))     undesirable  1 - sigma(beta (z0 - r))
        loss_type="apo_zero_unpaired":  desirable   1 - sigma(beta r)            undesirable  sigma(beta r)
        loss = (1/B) sum_i w_i * per-example loss_i,   w_i = desirable_weight or undesirable_weight.

    The two types are one formula: apo_zero_unpaired is kto with z0 = 0 and no KL pairs (it rejects ``kl``).
    This is TRL 1.16's ``KTOTrainer`` loss (the mean runs over the whole batch, not per class).

    Args:
        policy_logps: (B,) floating, usually with gradient: sum (or mean) of the policy's completion log-probs.
        ref_logps: (B,) floating: the same for the reference model (gradient, if any, is not blocked here).
        desirable: (B,) bool: True where the completion is labelled desirable.
        kl: z0 as a float >= 0 or a 0-d / one-element tensor (e.g. from ``kto_kl``), used as given and detached
            (a tensor's value is not checked: that would be a host sync).
            Required with loss_type="kto": ``kl=0.0`` is z0 = 0 (TRL's ``calculate_kl=False``), chosen
            explicitly; None raises ValueError. Not accepted with "apo_zero_unpaired", which has no z0.
        beta: > 0, the reward scale (TRL default 0.1).
        desirable_weight, undesirable_weight: >= 0, the class weights lambda_D and lambda_U (see
            ``suggest_kto_weights`` for imbalanced data).
        loss_type: "kto" or "apo_zero_unpaired".

    Returns:
        KTOOutput; ``loss`` is 0-d in the inputs' promoted dtype.
    """
    _check_kto_hyper(beta, desirable_weight, undesirable_weight, loss_type)
    n = _batch_size("policy_logps", policy_logps, "sequence")
    _check_logps("ref_logps", ref_logps, n, ("policy_logps", policy_logps))
    _check_desirable(desirable, n, policy_logps.device, "policy_logps")

    ratio = policy_logps - ref_logps
    z0 = _kto_reference_point(kl, loss_type, ratio)

    # apo_zero_unpaired is the kto formula with z0 = 0 (it takes no kl). sigma(-x) stands for 1 - sigma(x): the
    # same value without cancellation when sigma(x) is close to 1.
    shifted = beta * (ratio - z0)
    per_example = torch.where(desirable, torch.sigmoid(-shifted), torch.sigmoid(shifted))
    # fills, not new_tensor: a host value copied to the GPU waits for the stream (the H200 run's stack check
    # found these two syncs)
    weights = torch.where(desirable, torch.full_like(per_example, float(desirable_weight)),
                          torch.full_like(per_example, float(undesirable_weight)))
    losses = weights * per_example
    loss = losses.mean()

    return _kto_output(loss, losses, beta * ratio.detach(), z0, policy_logps, ref_logps, desirable)


def _kto_reference_point(kl: float | torch.Tensor | None, loss_type: str, ratio: torch.Tensor) -> torch.Tensor:
    """z0 of ``kto_loss`` as a 0-d tensor of ratio's dtype and device: ``kl`` checked against ``loss_type``."""
    uses_kl = KTO_LOSSES[loss_type].uses_kl
    if kl is None and uses_kl:
        # z0 = 0 is a legitimate choice (the reference point at the reference model), but a silent default made a
        # forgotten KL estimate look like a real one clamped at 0 in the logs
        raise ValueError(
            f"loss_type={loss_type!r} needs its reference point z0: pass kl=kto_kl(policy_kl_logps, ref_kl_logps) (the "
            "KL estimate from mismatched pairs, as TRL computes by default), or kl=0.0 to use z0 = 0 explicitly"
        )
    if kl is None:
        return torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    if not uses_kl:
        raise ValueError(f"loss_type={loss_type!r} uses no KL estimate; pass kl=None")
    if not (is_number(kl) or isinstance(kl, torch.Tensor)):
        raise TypeError(f"kl must be a number, a one-element tensor or None, got {type(kl).__name__}")
    if isinstance(kl, torch.Tensor) and kl.numel() != 1:
        raise ValueError(f"kl must hold one value (z0), got shape {tuple(kl.shape)}")
    # a Python float goes straight to the loss dtype (torch.as_tensor would round it to float32 first), made on
    # the device by a fill (a copy from the host would wait for the stream)
    if isinstance(kl, torch.Tensor):
        return kl.detach().reshape(()).to(device=ratio.device, dtype=ratio.dtype)
    # z0 estimates KL(policy || reference) >= 0 (kto_kl and TRL clamp their estimate at 0): a negative or
    # non-finite number is a bug upstream, not a reference point (a tensor is not read: no host sync)
    if torch.compiler.is_compiling():
        pass  # dynamic=True traces Python numbers symbolically: their values are checked by the eager calls
    elif not math.isfinite(kl):
        raise ValueError(f"kl must be finite (z0, a KL estimate), got {kl}")
    elif kl < 0:
        raise ValueError(f"kl must be >= 0 (z0 estimates a KL divergence; kto_kl clamps its estimate at 0), got {kl}")
    return torch.full((), float(kl), dtype=ratio.dtype, device=ratio.device)


@torch.no_grad()
def _kto_output(loss, losses, rewards, z0, policy_logps, ref_logps, desirable) -> KTOOutput:
    """``kto_loss``'s result: the loss with its graph, everything else detached, with the per-class means."""
    undesirable = ~desirable
    n_des, n_und = desirable.sum(), undesirable.sum()

    def class_mean(values, mask, count):  # NaN for an empty class, like an empty mean
        return torch.where(mask, values, 0).sum() / count

    return KTOOutput(
        loss=loss, losses=losses.detach(), rewards=rewards, kl=z0,
        policy_logps=policy_logps.detach(), ref_logps=ref_logps.detach(), desirable=desirable,
        n_desirable=n_des, n_undesirable=n_und,
        desirable_reward_mean=class_mean(rewards, desirable, n_des),
        undesirable_reward_mean=class_mean(rewards, undesirable, n_und),
        desirable_logps_mean=class_mean(policy_logps.detach(), desirable, n_des),
        undesirable_logps_mean=class_mean(policy_logps.detach(), undesirable, n_und),
    )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    bco_delta: float | torch.Tensor = 0.0,
) -> DPOOutput:
    """DPO and its TRL variants on per-sequence log-probabilities of P (chosen, rejected) pairs.

    With r_c = policy_chosen - ref_chosen, r_r = policy_rejected - ref_rejected, h = r_c - r_r, x = beta h,
    eps = label_smoothing, sigma the logistic function, per pair (``DPO_LOSSES``, one function per type):

{formulas}

    loss = mean over pairs. Values equal TRL 1.16's ``DPOTrainer`` (``f_divergence_type="reverse_kl"``, one loss
    type, no WPO weighting) for the same log-probabilities, with two documented extensions: TRL 1.16's
    ``sigmoid`` ignores label_smoothing (here eps > 0 gives conservative DPO, as in earlier TRL releases and the
    DPO authors' code; eps = 0 is identical), and TRL 1.16's ``bco_pair`` has no reward shift (delta = 0, the
    default here). The BCO paper subtracts a running mean of the rewards, delta; keep it yourself (e.g. an
    exponential moving average of ``(chosen_rewards + rejected_rewards) / 2`` from past outputs) and pass it.

    Args:
        policy_chosen_logps, policy_rejected_logps: (P,) floating, usually with gradient.
        ref_chosen_logps, ref_rejected_logps: (P,) floating.
        beta: > 0 (TRL default 0.1); for ipo it is the regularization tau of the IPO paper.
        loss_type: one of ``DPO_LOSS_TYPES``.
        label_smoothing: in [0, 0.5): eps of sigmoid (cDPO), robust and exo_pair (which needs eps > 0; the EXO
            paper uses 1e-3). Other loss types reject a non-zero value rather than ignore it.
        discopop_tau: > 0, the DiscoPOP temperature (TRL and the paper: 0.05).
        bco_delta: bco_pair's reward shift delta, a float or a 0-d tensor (detached); 0 = TRL 1.16.

    Returns:
        DPOOutput; ``loss`` is 0-d in the inputs' promoted dtype.
    """
    _check_dpo_hyper(beta, loss_type, label_smoothing, discopop_tau)
    pairs = _batch_size("policy_chosen_logps", policy_chosen_logps, "pair")
    first = ("policy_chosen_logps", policy_chosen_logps)
    _check_logps("policy_rejected_logps", policy_rejected_logps, pairs, first)
    _check_logps("ref_chosen_logps", ref_chosen_logps, pairs, first)
    _check_logps("ref_rejected_logps", ref_rejected_logps, pairs, first)
    if not (is_number(bco_delta) or isinstance(bco_delta, torch.Tensor)):
        raise TypeError(f"bco_delta must be a number or a 0-d tensor, got {type(bco_delta).__name__}")
    if isinstance(bco_delta, torch.Tensor):
        if bco_delta.numel() != 1:
            raise ValueError(f"bco_delta must hold one value, got shape {tuple(bco_delta.shape)}")
        bco_delta = bco_delta.detach().reshape(())
    row = DPO_LOSSES[loss_type]
    if not row.uses_bco_delta and not (isinstance(bco_delta, (int, float)) and bco_delta == 0):
        users = tuple(name for name, r in DPO_LOSSES.items() if r.uses_bco_delta)
        raise ValueError(f"bco_delta is used only by loss_type in {users}, not {loss_type!r}")

    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    constants = DPOConstants(float(beta), float(label_smoothing), float(discopop_tau), bco_delta)
    losses = row.per_pair(chosen_ratio, rejected_ratio, constants)
    loss = losses.mean()
    with torch.no_grad():
        chosen_rewards = beta * chosen_ratio.detach()
        rejected_rewards = beta * rejected_ratio.detach()
        return DPOOutput(
            loss=loss, losses=losses.detach(),
            chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
            margins=chosen_rewards - rejected_rewards,
            accuracy=(chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            policy_chosen_logps=policy_chosen_logps.detach(), policy_rejected_logps=policy_rejected_logps.detach(),
            ref_chosen_logps=ref_chosen_logps.detach(), ref_rejected_logps=ref_rejected_logps.detach(),
        )


KTO_WEIGHT_RULES = {"early": 4.0 / 3.0, "later": 1.5}


def suggest_kto_weights(n_desirable: int, n_undesirable: int, *, ratio: float = 1.0,
                        rule: str = "early") -> tuple[float, float]:
    """Class weights (desirable_weight, undesirable_weight) for imbalanced KTO data.

    The KTO paper's imbalance rule (Eq. 8) asks that the desirable side's total weight match, or slightly exceed,
    the undesirable side's: lambda_D n_D / (lambda_U n_U) in [1, c]. The upper end c changed between versions of
    the paper: ``rule="early"`` (the default) follows the early text, c = 4/3, which is the range TRL's KTO docs
    quote; ``rule="later"`` follows the later versions, c = 3/2. The two agree on ``ratio`` in [1, 4/3], so the
    version only matters for a ratio above 4/3. This returns weights meeting lambda_D n_D / (lambda_U n_U) =
    ``ratio`` exactly, keeping the larger class at weight 1 and up-weighting the smaller one (so a balanced dataset
    with ratio=1 gives (1.0, 1.0), TRL's defaults). E.g. 1,000 desirable and 10,000 undesirable examples give
    (10.0, 1.0); with ratio=4/3, (13.33, 1.0); with ratio=3/2 and rule="later", (15.0, 1.0).

    Args:
        n_desirable, n_undesirable: counts of desirable / undesirable examples in the training set (ints >= 1).
        ratio: the target lambda_D n_D / (lambda_U n_U), in [1, 4/3] ("early") or [1, 3/2] ("later").
        rule: which version of the paper's range to check ``ratio`` against: "early" or "later".

    Returns:
        (desirable_weight, undesirable_weight) as floats, to pass to ``kto_loss`` / ``KTOLoss``.
    """
    for name, value in (("n_desirable", n_desirable), ("n_undesirable", n_undesirable)):
        # numbers.Integral: NumPy integers too (counts summed from an array or a DataFrame)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int count, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (a class with no example needs no weight), got {value}")
    if rule not in KTO_WEIGHT_RULES:
        raise ValueError(f"rule must be 'early' (ratio in [1, 4/3]) or 'later' (ratio in [1, 3/2]), got {rule!r}")
    ratio = check_positive("ratio", ratio)
    upper = KTO_WEIGHT_RULES[rule]
    if not 1.0 <= ratio <= upper + 1e-12:
        bound = "4/3" if rule == "early" else "3/2"
        raise ValueError(f"ratio must lie in [1, {bound}] (the KTO paper's {rule} range), got {ratio}")
    n_desirable, n_undesirable = int(n_desirable), int(n_undesirable)
    if n_desirable <= n_undesirable * ratio:
        return ratio * n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / (ratio * n_undesirable)


# dpo_loss's docstring lists the formulas from the table, so a new row documents itself (no docstrings under -OO)
if dpo_loss.__doc__:
    dpo_loss.__doc__ = dpo_loss.__doc__.replace("{formulas}", "\n".join(
        f"        {name:<10} " + " ".join(line.strip() for line in (row.per_pair.__doc__ or "").splitlines())
        for name, row in DPO_LOSSES.items()
    ))


def __getattr__(name: str):
    # the modules (second layer) import this module, so they are re-exported lazily: ``fastkto.loss.KTOLoss`` and
    # ``from fastkto.loss import DPOLoss`` keep working, whichever of the two modules is imported first
    if name in ("KTOLoss", "DPOLoss"):
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
