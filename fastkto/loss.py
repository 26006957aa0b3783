"""KTO and DPO losses: the math on per-sequence log-probabilities, and modules that get those from hidden states.

Two layers, each usable alone:

* ``kto_loss``, ``kto_kl``, ``dpo_loss`` take ``(B,)`` per-sequence log-probabilities from anywhere (a model's
  logits, a precomputed reference column of a dataset, ``fastkto.sequence_logps``) and return a small dataclass
  holding the differentiable loss and detached training metrics.
* ``KTOLoss`` and ``DPOLoss`` take final hidden states and the LM-head weight and obtain every log-probability
  (policy, reference, KTO's KL pairs) through ``fastkto.sequence_logps``, so no (tokens x vocabulary) logits are
  built. The policy pass carries gradients; the reference and the KL pairs run under ``torch.no_grad()`` and
  save nothing for backward. Gradients flow through ordinary autograd: ``loss.backward()`` is all a training loop
  (or DDP's gradient hooks) needs.

Notation: for a sequence y, r(y) = log pi_theta(y|x) - log pi_ref(y|x) (sums over completion tokens, or means
with ``average_log_prob=True``), sigma the logistic function, log sigma computed stably.

KTO (Ethayarajh et al. 2024, Eq. 7), z0 a detached estimate of KL(pi_theta || pi_ref):

    kto:                desirable   1 - sigma(beta (r - z0))        undesirable   1 - sigma(beta (z0 - r))
    apo_zero_unpaired:  desirable   1 - sigma(beta r)               undesirable   sigma(beta r)
    loss = mean over the batch of  w(y) * per-example loss,  w = desirable_weight or undesirable_weight.

DPO: see ``dpo_loss`` for the per-pair formulas of every ``DPO_LOSS_TYPES`` entry.

Values match TRL 1.16's ``KTOTrainer`` / ``DPOTrainer`` for the same log-probabilities (tests/test_loss.py calls
TRL's own loss code); the differences are listed where they occur (``sigmoid`` label smoothing, ``bco_pair``'s
reward shift, the cross-rank mean of z0).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed as _dist
from . import labels as _labels
from . import packing
from .logprob import _check_inputs, _sequence_logps, check_sequence_values
from .value_checks import ValueChecks, host_reads_allowed

__all__ = [
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

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
    "discopop",
)
# the DPO types whose formula reads label_smoothing; any other type rejects a non-zero value instead of ignoring it
_SMOOTHED_DPO_TYPES = ("sigmoid", "robust", "exo_pair")


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


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        return value  # dynamic=True traces Python numbers symbolically: their values are checked by eager calls
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        return value  # dynamic=True traces Python numbers symbolically: their values are checked by eager calls
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_logps(name: str, t, size: int | None = None) -> torch.Tensor:
    """A floating (n,) tensor; with ``size``, n must equal it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of per-sequence log-probabilities, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
    if size is not None and t.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},) like the other per-sequence inputs, got {tuple(t.shape)}")
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


def _same_tensor(a, b) -> bool:
    """True when a and b are the same values for certain: one object, or views of the same memory with the same
    layout (e.g. ``weight`` and ``weight.detach()``). None matches only None."""
    if a is None or b is None:
        return a is None and b is None
    if a is b:
        return True
    if not host_reads_allowed(a, b):
        return False  # no data pointers while Dynamo traces or under fake tensors: compute the pass
    return (
        a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _check_dpo_hyper(beta, loss_type, label_smoothing, discopop_tau) -> None:
    _check_positive("beta", beta)
    _check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in _SMOOTHED_DPO_TYPES:
        raise ValueError(
            f"label_smoothing is used only by loss_type in {_SMOOTHED_DPO_TYPES}; loss_type={loss_type!r} "
            f"would ignore label_smoothing={label_smoothing}"
        )
    if loss_type == "exo_pair" and label_smoothing == 0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing > 0 (log of it is taken; the EXO paper uses 1e-3)")
    _check_positive("discopop_tau", discopop_tau)


def _check_kto_hyper(beta, desirable_weight, undesirable_weight, loss_type) -> None:
    _check_positive("beta", beta)
    _check_nonnegative("desirable_weight", desirable_weight)
    _check_nonnegative("undesirable_weight", undesirable_weight)
    _check_choice("loss_type", loss_type, KTO_LOSS_TYPES)


# ----------------------------------------------------------------------------------------------------------------
# layer 1: the math on (B,) log-probabilities


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, process_group=None) -> torch.Tensor:
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
    _check_logps("ref_kl_logps", ref_kl_logps, policy_kl_logps.shape[0])
    if process_group is None and policy_kl_logps.shape[0] == 0:
        raise ValueError("kto_kl needs at least one KL pair (policy_kl_logps has shape (0,))")
    with torch.no_grad():
        diff = policy_kl_logps.detach() - ref_kl_logps.detach()
        # sum in float64 (float32 on MPS, which has no float64) so that large batches lose nothing before dividing
        acc = torch.float32 if diff.device.type == "mps" else torch.float64
        stats = torch.stack([diff.sum(dtype=acc), torch.tensor(float(diff.shape[0]), dtype=acc, device=diff.device)])
        if process_group is not None:
            _dist.all_reduce_sum(stats, process_group)
        z0 = (stats[0] / stats[1].clamp(min=1.0)).clamp(min=0.0)
    return z0.to(diff.dtype)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl=None,
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
        kl: z0 as a float or a 0-d / one-element tensor (e.g. from ``kto_kl``), used as given and detached.
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
    _check_logps("ref_logps", ref_logps, n)
    _check_desirable(desirable, n, policy_logps.device, "policy_logps")

    ratio = policy_logps - ref_logps
    if kl is None and loss_type == "kto":
        # z0 = 0 is a legitimate choice (the reference point at the reference model), but a silent default made a
        # forgotten KL estimate look like a real one clamped at 0 in the logs
        raise ValueError(
            "loss_type='kto' needs its reference point z0: pass kl=kto_kl(policy_kl_logps, ref_kl_logps) (the KL "
            "estimate from mismatched pairs, as TRL computes by default), or kl=0.0 to use z0 = 0 explicitly"
        )
    if kl is None:
        z0 = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    elif loss_type == "apo_zero_unpaired":
        raise ValueError("loss_type='apo_zero_unpaired' uses no KL estimate; pass kl=None")
    else:
        if isinstance(kl, bool) or not isinstance(kl, (int, float, torch.Tensor)):
            raise TypeError(f"kl must be a number, a one-element tensor or None, got {type(kl).__name__}")
        if isinstance(kl, torch.Tensor) and kl.numel() != 1:
            raise ValueError(f"kl must hold one value (z0), got shape {tuple(kl.shape)}")
        # a Python float goes straight to the loss dtype (torch.as_tensor would round it to float32 first)
        z0 = kl.detach().reshape(()) if isinstance(kl, torch.Tensor) else torch.tensor(float(kl), dtype=ratio.dtype)
        z0 = z0.to(device=ratio.device, dtype=ratio.dtype)

    # apo_zero_unpaired is the kto formula with z0 = 0 (it takes no kl). sigma(-x) stands for 1 - sigma(x): the
    # same value without cancellation when sigma(x) is close to 1.
    shifted = beta * (ratio - z0)
    per_example = torch.where(desirable, torch.sigmoid(-shifted), torch.sigmoid(shifted))
    weights = torch.where(
        desirable, per_example.new_tensor(desirable_weight), per_example.new_tensor(undesirable_weight)
    )
    losses = weights * per_example
    loss = losses.mean()

    with torch.no_grad():
        rewards = beta * ratio.detach()
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


def _dpo_per_pair(loss_type, chosen_ratio, rejected_ratio, beta, eps, tau, bco_delta):
    """Per-pair DPO-family losses; the formulas are in ``dpo_loss``'s docstring."""
    margin = chosen_ratio - rejected_ratio  # h
    x = beta * margin
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x) if eps else -F.logsigmoid(x)
    if loss_type == "hinge":
        return torch.relu(1 - x)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        # KL(q || p) over {chosen, rejected}: q = (sigma(x), sigma(-x)) the model's, p = (1 - eps, eps) the labels'
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(eps)
        )
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_ratio - bco_delta) - F.logsigmoid(-(beta * rejected_ratio - bco_delta))
    if loss_type == "sppo_hard":
        return (chosen_ratio - 1 / (2 * beta)) ** 2 + (rejected_ratio + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        c, r = beta * chosen_ratio, beta * rejected_ratio
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if loss_type == "apo_zero":
        return torch.sigmoid(-beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(-x)
    if loss_type == "discopop":
        mix = torch.sigmoid(x / tau)
        return (1 - mix) * -F.logsigmoid(x) + mix * torch.exp(-x)
    raise AssertionError(loss_type)  # unreachable: loss_type was checked


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
    bco_delta=0.0,
) -> DPOOutput:
    """DPO and its TRL variants on per-sequence log-probabilities of P (chosen, rejected) pairs.

    With r_c = policy_chosen - ref_chosen, r_r = policy_rejected - ref_rejected, h = r_c - r_r, x = beta h,
    eps = label_smoothing, sigma the logistic function, per pair:

        sigmoid    -(1 - eps) log sigma(x) - eps log sigma(-x)        (DPO; eps > 0: conservative DPO)
        hinge      max(0, 1 - x)                                       (SLiC)
        ipo        (h - 1 / (2 beta))^2                                (IPO Eq. 17: pass length-averaged log-probs;
                                                                        ``DPOLoss`` averages for this type)
        robust     (-(1 - eps) log sigma(x) + eps log sigma(-x)) / (1 - 2 eps)      (rDPO)
        exo_pair   sigma(x) (log sigma(x) - log(1 - eps)) + sigma(-x) (log sigma(-x) - log eps),  eps > 0  (EXO)
        bco_pair   -log sigma(beta r_c - delta) - log sigma(-(beta r_r - delta)),  delta = bco_delta      (BCO)
        sppo_hard  (r_c - 1 / (2 beta))^2 + (r_r + 1 / (2 beta))^2                                       (SPPO)
        nca_pair   -log sigma(beta r_c) - 1/2 log sigma(-beta r_c) - 1/2 log sigma(-beta r_r)            (NCA)
        apo_zero   1 - sigma(beta r_c) + sigma(beta r_r)                                                 (APO)
        apo_down   sigma(beta r_c) + 1 - sigma(x)                                                        (APO)
        discopop   (1 - m) (-log sigma(x)) + m exp(-x),  m = sigma(x / tau),  tau = discopop_tau         (DiscoPOP)

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
    _check_logps("policy_rejected_logps", policy_rejected_logps, pairs)
    _check_logps("ref_chosen_logps", ref_chosen_logps, pairs)
    _check_logps("ref_rejected_logps", ref_rejected_logps, pairs)
    if isinstance(bco_delta, bool) or not isinstance(bco_delta, (int, float, torch.Tensor)):
        raise TypeError(f"bco_delta must be a number or a 0-d tensor, got {type(bco_delta).__name__}")
    if isinstance(bco_delta, torch.Tensor):
        if bco_delta.numel() != 1:
            raise ValueError(f"bco_delta must hold one value, got shape {tuple(bco_delta.shape)}")
        bco_delta = bco_delta.detach().reshape(())
    if loss_type != "bco_pair" and not (isinstance(bco_delta, (int, float)) and bco_delta == 0):
        raise ValueError(f"bco_delta is used only by loss_type='bco_pair', not {loss_type!r}")

    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = _dpo_per_pair(
        loss_type, chosen_ratio, rejected_ratio, float(beta), float(label_smoothing), float(discopop_tau), bco_delta
    )
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
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int count, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (a class with no example needs no weight), got {value}")
    if rule not in KTO_WEIGHT_RULES:
        raise ValueError(f"rule must be 'early' (ratio in [1, 4/3]) or 'later' (ratio in [1, 3/2]), got {rule!r}")
    ratio = _check_positive("ratio", ratio)
    upper = KTO_WEIGHT_RULES[rule]
    if not 1.0 <= ratio <= upper + 1e-12:
        bound = "4/3" if rule == "early" else "3/2"
        raise ValueError(f"ratio must lie in [1, {bound}] (the KTO paper's {rule} range), got {ratio}")
    if n_desirable <= n_undesirable * ratio:
        return ratio * n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / (ratio * n_undesirable)


# ----------------------------------------------------------------------------------------------------------------
# layer 2: modules from hidden states


@dataclass
class _Batch:
    """The layout of one set of sequences: n of them, padded (cu_seqlens None) or packed."""

    n: int
    cu_seqlens: torch.Tensor | None = None
    lengths: torch.Tensor | None = None  # (n,) int64, packed only
    cu_name: str = "cu_seqlens"
    checked: object = None  # what logprob.check_sequence_values returned, once the values are read
    total: int = 0  # packed tokens, packed only


def _shape_of(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_batch(hidden, labels, cu_seqlens, hidden_name="policy_hidden", labels_name="labels",
                 cu_name="cu_seqlens") -> _Batch:
    """Check the shapes of hidden states and labels against their layout: padded (B, T, D) and (B, T), or packed
    (T_total, D) / (1, T_total, D) and hidden's leading shape with ``cu_seqlens``."""
    if cu_seqlens is None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            hint = f" (a packed batch also needs {cu_name})" if isinstance(hidden, torch.Tensor) else ""
            raise ValueError(f"{hidden_name} must be a (B, T, D) tensor, got {_shape_of(hidden)}{hint}")
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"{labels_name} must have {hidden_name}'s (B, T) = {tuple(hidden.shape[:2])}, got "
                             f"{_shape_of(labels)}")
        return _Batch(hidden.shape[0])
    if not isinstance(hidden, torch.Tensor) or not (hidden.dim() == 2 or (hidden.dim() == 3 and hidden.shape[0] == 1)):
        raise ValueError(f"{hidden_name} of a packed batch ({cu_name} given) must be a (T_total, D) or "
                         f"(1, T_total, D) tensor, got {_shape_of(hidden)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{labels_name} must have {hidden_name}'s leading shape {tuple(hidden.shape[:-1])} (one label "
                         f"per packed token), got {_shape_of(labels)}")
    lengths = packing.cu_seqlens_lengths(cu_seqlens, labels.shape[-1], device=labels.device, name=cu_name,
                                         tokens_name=labels_name)  # its values: checked with the labels'
    return _Batch(lengths.shape[0], cu_seqlens, lengths, cu_name, total=labels.shape[-1])


@contextlib.contextmanager
def _layout_errors_first(batch: _Batch):
    """A packed layout's values are read with the other value checks, after the shape checks; but a wrong layout
    makes the other shapes disagree too (a desirable of B labels against B - 1 sequences). On that error path only,
    the layout's values are checked first, so that the error names the cause."""
    try:
        yield
    except (TypeError, ValueError):
        if batch.cu_seqlens is not None and host_reads_allowed(batch.cu_seqlens):
            packing.check_cu_seqlens(batch.cu_seqlens, batch.total, name=batch.cu_name)
        raise


def _reference_head(prefix, weight, bias, ref_weight, ref_bias):
    """The (weight, bias) that score the reference pass named by ``prefix`` ("ref" or "kl_ref").

    Defaults to the policy's head, detached, only while that head is frozen (LoRA, a frozen or shared head): a
    trainable one (``weight.requires_grad``: untied, or tied to a trained embedding) would score the reference with
    the current head, not the reference model's, and every reward would drift with the head. So ``ref_weight`` is
    required then, and ``ref_bias`` when the bias is trainable.
    """
    how = (f"pass ref_weight=ref_model.get_output_embeddings().weight (the reference model's own LM head; for a "
           f"reference that starts as the policy, a frozen copy taken before training: weight.detach().clone()), or "
           f"{prefix}_logps instead of {prefix}_hidden")
    if ref_weight is None:
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            raise ValueError(
                f"ref_weight is required: weight requires grad (a trainable LM head, untied or tied to a trained "
                f"embedding), so the default reference head, the policy's head detached, would score {prefix}_hidden "
                f"with the head being trained instead of the reference's; {how}. A frozen head "
                f"(weight.requires_grad False, as with LoRA) needs no ref_weight"
            )
        ref_weight = weight.detach() if isinstance(weight, torch.Tensor) else weight
    elif isinstance(ref_weight, torch.Tensor) and isinstance(weight, torch.Tensor) and ref_weight.dim() == 2 \
            and weight.dim() == 2 and ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight has vocabulary size {ref_weight.shape[0]} but weight has {weight.shape[0]} (shapes "
            f"{tuple(ref_weight.shape)} and {tuple(weight.shape)}, (V, D)): the reference must score the same "
            f"vocabulary (a reference with a resized or different tokenizer cannot be compared token by token)"
        )
    if ref_bias is None and isinstance(bias, torch.Tensor):
        if bias.requires_grad:
            raise ValueError(
                "ref_bias is required: bias requires grad (a trainable LM-head bias), so the default, the policy's "
                "bias detached, would score the reference with the bias being trained; pass ref_bias=the reference "
                "model's LM-head bias (or a frozen copy taken before training: bias.detach().clone())"
            )
        ref_bias = bias.detach()
    return ref_weight, ref_bias


def _check_head_pass(hidden_name, hidden, weight_name, weight, bias_name, bias) -> None:
    """Check the hidden states and head of one pass with the names the caller used (``ref_hidden``, ``kl_hidden``,
    ``ref_weight``, ...), before ``sequence_logps`` would report them as plain "hidden" / "weight"."""
    for name, t in ((hidden_name, hidden), (weight_name, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or hidden.dim() < 1:
        return  # sequence_logps names these shapes
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        if hidden.shape[-1] == vocab and vocab < dim:  # a vocabulary is larger than a hidden size
            raise ValueError(
                f"{weight_name} has shape {tuple(weight.shape)}, which looks transposed: it must be (V, D), one row "
                f"per vocabulary entry (the LM head's nn.Linear weight as it is, not .T), with D = "
                f"{hidden_name}'s last dimension ({hidden.shape[-1]})"
            )
        if hidden.shape[-1] == vocab:
            raise ValueError(
                f"{hidden_name}'s last dimension is {vocab}, {weight_name}'s vocabulary size, not its hidden size "
                f"D={dim}: these look like logits (the LM head's output). Pass the final hidden states, the "
                f"backbone's output before the LM head (fastkto.integrations.transformers.hidden_states(model, "
                f"input_ids), or model.model(...).last_hidden_state)"
            )
        raise ValueError(
            f"hidden size mismatch: {hidden_name} has D={hidden.shape[-1]} but {weight_name} has shape "
            f"{tuple(weight.shape)} (V, D)"
        )
    if (hidden.dtype != weight.dtype and hidden.dtype.is_floating_point and weight.dtype.is_floating_point
            and not (hidden.device.type != "meta" and torch.is_autocast_enabled(hidden.device.type))):
        raise TypeError(
            f"{hidden_name} and {weight_name} must share a dtype, got {hidden.dtype} and {weight.dtype}: run the call "
            f"under torch.autocast, or cast one of them, e.g. {hidden_name}.to({weight.dtype})"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{bias_name} must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"{bias_name} must have shape (V,) = ({vocab},) like {weight_name}'s rows, got "
                             f"{tuple(bias.shape)}")


class _SequenceLogps(torch.nn.Module):
    """Shared by KTOLoss and DPOLoss: the ``sequence_logps`` options and the reference / reuse logic."""

    def __init__(self, ignore_index, temperature, softcap, backend, average_log_prob, workspace_bytes):
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        _check_positive("temperature", temperature)
        if softcap is not None:
            _check_positive("softcap", softcap)
        _check_choice("backend", backend, ("auto", "triton", "torch"))
        if average_log_prob is not None and not isinstance(average_log_prob, bool):
            raise TypeError(f"average_log_prob must be a bool, got {type(average_log_prob).__name__}")
        if workspace_bytes is not None:
            _check_positive("workspace_bytes", workspace_bytes)
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.backend, self.average_log_prob, self.workspace_bytes = backend, average_log_prob, workspace_bytes

    def _average(self) -> bool:
        return bool(self.average_log_prob)

    def _check_values(self, checks: ValueChecks, hidden, weight, bias, labels, label_name, batch: _Batch) -> None:
        """Registers the value checks of one layout's passes with ``checks`` (run once for the whole call): the packed
        layout, that every row scores at least one token (an all-ignored row, T = 0 or an empty packed sequence has
        log-prob 0, which would add a constant with zero gradient to the loss and count in its means as if it were a
        real sequence), and the labels' range and scored count. The pass's arguments are checked first (shapes and
        dtypes: a transposed weight is named as such, not by the labels it makes look out of range)."""
        _check_inputs(hidden, weight, labels, bias, self.ignore_index, self.temperature, self.softcap)

        def scored_rows(lengths):
            scored = labels != self.ignore_index
            if lengths is None:
                empty = ~scored.any(dim=-1)
                what = f"{label_name} rows"
            else:  # counts from a running sum: no host read, and no failure before a bad layout is reported
                running = torch.nn.functional.pad(scored.reshape(-1).long().cumsum(0), (1, 0))
                bounds = batch.cu_seqlens.long().clamp(0, labels.shape[-1])
                empty = (running[bounds[1:]] - running[bounds[:-1]]) <= 0
                what = f"packed sequences of {label_name} (as {batch.cu_name} splits it)"
            n_empty = empty.sum()
            hint = "drop those sequences from the batch (a truncated completion, an empty answer)"

            def read(values):
                if values and values[0]:
                    rows = empty.nonzero().flatten().tolist()
                    shown = f"{rows[:10]}{' ...' if len(rows) > 10 else ''}"
                    raise ValueError(
                        f"{what} {shown} have no scored token (every label is ignore_index={self.ignore_index}, or "
                        f"the sequence is empty); {hint}"
                    )

            checks.add((n_empty,), n_empty == 0, f"{what} have no scored token: {hint}", read)

        batch.checked = check_sequence_values(checks, labels, batch.cu_seqlens, self.ignore_index, weight.shape[0],
                                              name=label_name, cu_name=batch.cu_name, after_layout=scored_rows)
        # fastkto.labels: every sequence scored at its last position, which shifted labels never are (a warning: a
        # batch cut by hand, hidden[:, :-1] against input_ids[:, 1:], without padding, looks the same)
        unshifted = _labels.unshifted_fact(labels, ignore_index=self.ignore_index, lengths=batch.lengths)

        def warn(values):
            if values and values[0]:
                _labels.warn_unshifted(label_name, packed=batch.lengths is not None, stacklevel=5)

        checks.add((unshifted,), None, "", warn)

    def _logps(self, hidden, weight, labels, bias, batch: _Batch):
        return _sequence_logps(
            hidden, weight, labels, cu_seqlens=batch.cu_seqlens, average=self._average(), bias=bias,
            ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap, backend=self.backend,
            workspace_bytes=self.workspace_bytes, checked=batch.checked,
        )

    def _reference(self, prefix, hidden, weight, bias, labels, batch, policy_logps, ref_hidden, ref_weight, ref_bias,
                   ref_logps):
        """The reference's (B,) log-probs of ``labels``: given, reused, or one no-grad pass over ref_hidden.

        ``prefix`` names the arguments in errors ("ref" or "kl_ref"). ``batch`` is the layout of ``hidden`` and
        ``labels`` (the reference scores the same sequences, so ref_hidden shares it). ``policy_logps`` is the
        policy's result for the same labels (None if it was not computed), reused when the reference is the same
        computation.
        """
        hidden_name = "policy_hidden" if prefix == "ref" else "kl_hidden"
        n = batch.n
        if ref_logps is not None:
            if ref_hidden is not None:
                raise ValueError(f"pass {prefix}_logps or {prefix}_hidden, not both")
            return _check_logps(f"{prefix}_logps", ref_logps, n).detach()
        if ref_hidden is None:
            raise ValueError(
                f"the reference is missing: pass {prefix}_logps ({n},) (precomputed) or {prefix}_hidden "
                f"(the reference model's final hidden states, shaped like {hidden_name})"
            )
        # the policy's own head by default (frozen): known the same without comparing data pointers, which a
        # compiled call cannot read
        same_head = ref_weight is None and ref_bias is None
        ref_weight, ref_bias = _reference_head(prefix, weight, bias, ref_weight, ref_bias)
        if isinstance(ref_hidden, torch.Tensor):
            _check_head_pass(f"{prefix}_hidden", ref_hidden, "ref_weight", ref_weight, "ref_bias", ref_bias)
        if not isinstance(ref_hidden, torch.Tensor) or tuple(ref_hidden.shape) != tuple(hidden.shape):
            shape = tuple(ref_hidden.shape) if isinstance(ref_hidden, torch.Tensor) else type(ref_hidden).__name__
            raise ValueError(
                f"{prefix}_hidden must have {hidden_name}'s shape {tuple(hidden.shape)} (the same sequences under the "
                f"reference model), got {shape}"
            )
        if policy_logps is not None and _same_tensor(ref_hidden, hidden) and (
                same_head or (_same_tensor(ref_weight, weight) and _same_tensor(ref_bias, bias))):
            return policy_logps.detach()  # the same computation: reuse it, no second pass
        with torch.no_grad():
            return self._logps(ref_hidden, ref_weight, labels, ref_bias, batch)

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, softcap={self.softcap}, "
            f"backend={self.backend!r}, average_log_prob={self.average_log_prob}"
        )


class KTOLoss(_SequenceLogps):
    """KTO from final hidden states, never building the logits: ``kto_loss`` on ``sequence_logps`` outputs.

    Constructor: the ``kto_loss`` hyper-parameters (beta, desirable_weight, undesirable_weight, loss_type), and
    the ``sequence_logps`` options used for every pass: ignore_index (label of prompt / padding positions),
    temperature, softcap, backend ("auto", "triton", "torch"), average_log_prob (False: sum over completion
    tokens, as TRL; True: the mean), workspace_bytes.

    Call: ``loss_fn(policy_hidden, weight, labels, desirable, *, ...) -> KTOOutput``

        policy_hidden  (B, T, D) float32 / bfloat16 / float16: the policy's final hidden states, with gradient.
        weight         (V, D): the policy's LM-head weight.  bias: (V,) or None.
        labels         (B, T) int: labels[b, t] is scored from policy_hidden[b, t] (already shifted), prompt and
                       padding positions = ignore_index.
        desirable      (B,) bool.
        reference      ref_logps (B,) precomputed, or ref_hidden (B, T, D) from the reference model scored with
                       ref_weight / ref_bias: the reference model's LM head, same vocabulary as weight. Required
                       when weight (bias) requires grad; a frozen head (LoRA, a frozen or shared head) may leave
                       them None for the policy's, detached. When ref_hidden is policy_hidden and the head is the
                       same, the policy's log-probs are reused.
        z0             kl (precomputed), or KL pairs: kl_hidden (B_kl, T_kl, D) and kl_labels under the policy, and
                       kl_ref_logps (B_kl,) or kl_ref_hidden under the reference; averaged over
                       kl_process_group's ranks when given (see ``kto_kl``). loss_type="kto" needs one of
                       them (``kl=0.0`` for z0 = 0, chosen explicitly); without either it raises ValueError.
        packed         cu_seqlens (B + 1,) int: policy_hidden is (T_total, D) or (1, T_total, D), labels its leading
                       shape, the B sequences concatenated (``fastkto.packing``; ``KTOCollator(packed=True)``);
                       ref_hidden shares that layout. kl_cu_seqlens does the same for kl_hidden / kl_labels (the
                       KL pairs' own layout). Results equal the padded layout's (see ``sequence_logps``).

    The reference and KL passes run under torch.no_grad() and save nothing for backward; only the policy pass is
    differentiable (gradients reach policy_hidden, weight and bias through ordinary autograd).
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 loss_type: str = "kto", *, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", average_log_prob: bool = False,
                 workspace_bytes: int | None = None):
        super().__init__(ignore_index, temperature, softcap, backend, average_log_prob, workspace_bytes)
        _check_kto_hyper(beta, desirable_weight, undesirable_weight, loss_type)
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def forward(self, policy_hidden, weight, labels, desirable, *, ref_hidden=None, ref_weight=None, ref_logps=None,
                kl_hidden=None, kl_labels=None, kl_ref_hidden=None, kl_ref_logps=None, kl=None, bias=None,
                ref_bias=None, kl_process_group=None, cu_seqlens=None, kl_cu_seqlens=None) -> KTOOutput:
        batch = _check_batch(policy_hidden, labels, cu_seqlens)
        _check_head_pass("policy_hidden", policy_hidden, "weight", weight, "bias", bias)
        with _layout_errors_first(batch):
            _check_desirable(desirable, batch.n, policy_hidden.device, "policy_hidden")
            if batch.n == 0:
                raise ValueError("cu_seqlens holds no sequence: the batch must hold at least one")
            if kl is None and kl_hidden is None and self.loss_type == "kto":
                raise ValueError(
                    "loss_type='kto' needs its reference point z0: pass the KL pairs (kl_hidden, kl_labels and "
                    "kl_ref_hidden or kl_ref_logps; KTOCollator builds kl_input_ids / kl_labels), a precomputed kl, or "
                    "kl=0.0 to use z0 = 0 explicitly"
                )
            kl_inputs = {"kl_labels": kl_labels, "kl_ref_hidden": kl_ref_hidden, "kl_ref_logps": kl_ref_logps,
                         "kl_process_group": kl_process_group, "kl_cu_seqlens": kl_cu_seqlens}
            kl_batch = None
            if kl_hidden is None:
                given = [name for name, value in kl_inputs.items() if value is not None]
                if given:
                    raise ValueError(f"{', '.join(given)} given without kl_hidden (the KL pairs' hidden states)")
            else:
                if kl_labels is None:
                    raise ValueError("kl_hidden needs kl_labels: the (B_kl, T_kl) labels of the KL pairs")
                if kl is not None:
                    raise ValueError("pass kl (a precomputed z0) or the KL pairs (kl_hidden, ...), not both")
                if self.loss_type == "apo_zero_unpaired":
                    raise ValueError("loss_type='apo_zero_unpaired' uses no KL estimate; do not pass kl_hidden")
                # the KL pairs have their own layout: padded (B_kl, T_kl, D), or packed with kl_cu_seqlens
                kl_batch = _check_batch(kl_hidden, kl_labels, kl_cu_seqlens, "kl_hidden", "kl_labels", "kl_cu_seqlens")
                _check_head_pass("kl_hidden", kl_hidden, "weight", weight, "bias", bias)

        checks = ValueChecks(policy_hidden, labels)  # one host sync for every pass's value checks
        self._check_values(checks, policy_hidden, weight, bias, labels, "labels", batch)
        if kl_batch is not None:
            self._check_values(checks, kl_hidden, weight, bias, kl_labels, "kl_labels", kl_batch)
        checks.run()
        policy_logps = self._logps(policy_hidden, weight, labels, bias, batch)
        ref = self._reference("ref", policy_hidden, weight, bias, labels, batch, policy_logps, ref_hidden, ref_weight,
                              ref_bias, ref_logps)
        if kl_batch is not None:
            with torch.no_grad():
                kl_policy = self._logps(kl_hidden, weight, kl_labels, bias, kl_batch)
            kl_ref = self._reference("kl_ref", kl_hidden, weight, bias, kl_labels, kl_batch, kl_policy, kl_ref_hidden,
                                     ref_weight, ref_bias, kl_ref_logps)
            kl = kto_kl(kl_policy, kl_ref, process_group=kl_process_group)
        return kto_loss(policy_logps, ref, desirable, kl=kl, beta=self.beta, desirable_weight=self.desirable_weight,
                        undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
                f"undesirable_weight={self.undesirable_weight}, loss_type={self.loss_type!r}, " + super().extra_repr())


class DPOLoss(_SequenceLogps):
    """DPO (and variants) from final hidden states, never building the logits: ``dpo_loss`` on ``sequence_logps``.

    Constructor: the ``dpo_loss`` hyper-parameters (beta, loss_type, label_smoothing, discopop_tau), the
    ``sequence_logps`` options (ignore_index, temperature, softcap, backend, workspace_bytes), average_log_prob
    (None: length-averaged log-probs for loss_type="ipo", as TRL does, sums otherwise; or force True / False),
    and reference_free (True: the reference log-probs are 0 and no reference is needed or accepted).

    Call: ``loss_fn(policy_hidden, weight, labels, *, ...) -> DPOOutput``. The batch holds 2P sequences: rows
    [0, P) the chosen completions, rows [P, 2P) the rejected ones, pair i = (row i, row P + i) (TRL's layout).
    Shapes and the reference arguments (ref_logps (2P,), or ref_hidden with ref_weight / ref_bias, which may
    default to the policy's head detached only when that head is frozen) are as in ``KTOLoss``. ``bco_delta``
    (bco_pair's reward shift) is a call argument because it changes every step. Packed batches: ``cu_seqlens``
    (2P + 1,) as in ``KTOLoss``, the P chosen sequences first, then the P rejected ones
    (``PairedCollator(packed=True)``).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
                 discopop_tau: float = 0.05, reference_free: bool = False, ignore_index: int = -100,
                 temperature: float = 1.0, softcap: float | None = None, backend: str = "auto",
                 average_log_prob: bool | None = None, workspace_bytes: int | None = None):
        super().__init__(ignore_index, temperature, softcap, backend, average_log_prob, workspace_bytes)
        _check_dpo_hyper(beta, loss_type, label_smoothing, discopop_tau)
        if not isinstance(reference_free, bool):
            raise TypeError(f"reference_free must be a bool, got {type(reference_free).__name__}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.discopop_tau, self.reference_free = discopop_tau, reference_free

    def _average(self) -> bool:
        return self.loss_type == "ipo" if self.average_log_prob is None else self.average_log_prob

    def forward(self, policy_hidden, weight, labels, *, ref_hidden=None, ref_weight=None, ref_logps=None,
                bias=None, ref_bias=None, bco_delta=0.0, cu_seqlens=None) -> DPOOutput:
        batch = _check_batch(policy_hidden, labels, cu_seqlens)
        _check_head_pass("policy_hidden", policy_hidden, "weight", weight, "bias", bias)
        with _layout_errors_first(batch):
            rows = batch.n
            if rows % 2:
                if batch.cu_seqlens is not None:
                    raise ValueError(f"DPOLoss needs an even number of packed sequences (the P chosen ones, then the P "
                                     f"rejected ones, pair i = sequences i and P + i), but cu_seqlens holds {rows}")
                raise ValueError(f"DPOLoss needs an even batch (chosen rows, then rejected rows), got B={rows}")
            if rows == 0:
                name = "policy_hidden" if batch.cu_seqlens is None else "cu_seqlens"
                raise ValueError(f"{name} is empty: the batch must hold at least one pair")
            if self.reference_free:
                given = [name for name, v in (("ref_hidden", ref_hidden), ("ref_logps", ref_logps),
                                               ("ref_weight", ref_weight), ("ref_bias", ref_bias)) if v is not None]
                if given:
                    raise ValueError(f"reference_free=True takes no reference, got {', '.join(given)}")
        checks = ValueChecks(policy_hidden, labels)  # one host sync for every pass's value checks
        self._check_values(checks, policy_hidden, weight, bias, labels, "labels", batch)
        checks.run()

        logps = self._logps(policy_hidden, weight, labels, bias, batch)
        if self.reference_free:
            ref = torch.zeros_like(logps).detach()
        else:
            ref = self._reference("ref", policy_hidden, weight, bias, labels, batch, logps, ref_hidden, ref_weight,
                                  ref_bias, ref_logps)
        pairs = rows // 2
        return dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=self.beta,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                        discopop_tau=self.discopop_tau, bco_delta=bco_delta)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"reference_free={self.reference_free}, " + super().extra_repr())
