"""TRL's ``KTOTrainer`` and ``DPOTrainer`` with fastkto computing their log-probabilities (TRL >= 1.16).

How TRL computes log-probs: during ``__init__`` both trainers call ``trl.trainer.utils.add_fused_lm_head(model,
outputs=...)`` on the policy (the base model under PEFT) and on the reference model. That patches ``forward`` so
``model(..., labels=labels, fused_lm_head=True)`` runs the backbone, scores the next-token labels through the LM head
in chunks, and returns a ``FusedCausalLMOutput`` (per-token ``log_probs`` plus the metric fields listed in
``outputs``). Everything else (losses, KL, metrics, PEFT reference, precomputed reference log-probs) reads that
output.

The adapter is therefore one function and two thin subclasses:

* ``add_fastkto_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",))``: the same
  signature and the same output, with ``log_probs`` from ``fastkto`` (backbone hidden states, ``LMHead.logprobs``:
  gradients through fastkto's autograd, nothing of size tokens x vocabulary kept for backward).
* ``FastKTOTrainer`` / ``FastDPOTrainer``: ``KTOTrainer`` / ``DPOTrainer`` whose ``__init__`` hands TRL this
  function instead of its own, for the duration of the call. Configs (``KTOConfig`` / ``DPOConfig``), loss formulas
  and logged metrics are TRL's, unchanged.

Precision: the head's matmul inputs are the head's dtype, or the autocast dtype inside autocast (TRL's default
``bf16=True`` mixed precision; the cast ``nn.Linear`` and ``fastkto.fused_logprobs`` make there), or float32
with ``cast_lm_head_to_fp32``; fastkto then accumulates in float32 (TRL's own head multiplies in bf16 in its
backward under autocast, so bf16 runs agree with TRL's to bf16 precision, float32 runs to float32 rounding).

The metric-only fields TRL asks for on the policy (``entropy``, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``)
need the whole distribution of each scored token: they are computed without gradient in row chunks whose logits fit
``metrics_workspace_bytes`` (default 64 MiB), which costs one extra no-grad pass through the head. ``entropy`` carries
no gradient here (KTO and DPO log it detached). Not supported: MoE router auxiliary losses (set
``router_aux_loss_coef=0``), an adapter on the LM head, and casting a ZeRO-3 partitioned head to another dtype
(``cast_lm_head_to_fp32``; see ``fastkto.integrations.transformers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types

import torch

try:
    from trl import DPOTrainer, KTOTrainer
    from trl.trainer import dpo_trainer as _dpo_module
    from trl.trainer import kto_trainer as _kto_module
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError("fastkto.integrations.trl needs TRL >= 1.16: pip install 'trl>=1.16'") from err

from .transformers import _is_partitioned, get_backbone, get_lm_head, unwrap_model

__all__ = ["add_fastkto_lm_head", "FastKTOTrainer", "FastDPOTrainer", "METRIC_FIELDS"]

METRIC_FIELDS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
_MARK = "_fastkto_lm_head"
_METRICS_WORKSPACE = 64 << 20


@torch.no_grad()
def _metric_fields(head, hidden, labels, mask, fields, workspace_bytes):
    """Per-token metric fields (mask's shape, zero where masked) from the full distribution, in row chunks."""
    out = {
        name: torch.zeros(mask.shape, device=hidden.device, dtype=torch.bool if name == "is_top1" else torch.float32)
        for name in fields
    }
    if not fields or not bool(mask.any()):
        return out
    rows, targets = hidden[mask], labels[mask]
    vocab = head.weight.shape[0]
    chunk = max(1, workspace_bytes // (3 * 4 * vocab))  # logits, probabilities and one temporary, fp32
    parts = {name: [] for name in fields}
    for start in range(0, rows.shape[0], chunk):
        z = head.logits(rows[start : start + chunk])
        lse = torch.logsumexp(z, dim=-1)
        if "entropy" in fields:
            parts["entropy"].append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
        if "mean_logits" in fields:
            parts["mean_logits"].append(z.mean(-1))
        if "is_top1" in fields:  # argmax returns the first maximum, as TRL counts ties
            parts["is_top1"].append(z.argmax(-1) == targets[start : start + chunk])
        if "log_sum_sq_probs" in fields:
            parts["log_sum_sq_probs"].append(torch.logsumexp(2 * z, dim=-1) - 2 * lse)
    for name in fields:
        out[name][mask] = torch.cat(parts[name])
    return out


def add_fastkto_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    metrics_workspace_bytes: int = _METRICS_WORKSPACE,
) -> None:
    """Patch ``model`` so ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``
    with ``log_probs`` computed by fastkto. A drop-in for ``trl.trainer.utils.add_fused_lm_head``.

    Args:
        model: a transformers causal LM (patch it before PEFT wraps it, or pass ``peft_model.get_base_model()``).
        temperature: divides the logits (after the model's own logit transform).
        cast_lm_head_to_fp32: score in float32 (hidden states and head weight upcast), even under autocast.
        outputs: per-token fields to fill: "log_probs" always, plus any of ``METRIC_FIELDS`` (computed without
            gradient, see the module docstring).
        metrics_workspace_bytes: logits budget of the metric pass.

    Forward with ``fused_lm_head=True``: ``labels`` (B, T) with -100 on unscored positions are shifted here (hidden
    state t scores label t + 1) unless ``shift_labels`` (B, T) is given already shifted; returns per-token fields of
    shape (B, T - 1) (or (B, T)), zero where masked, and ``loss`` = -sum(log_probs) / (number of scored tokens or
    ``num_items_in_batch``). Without it, the forward is the original one (generation is unchanged).
    """
    unknown = set(outputs) - {"log_probs", *METRIC_FIELDS}
    if unknown:
        raise ValueError(f"outputs may only name 'log_probs' and {METRIC_FIELDS}; got {sorted(unknown)}")
    metric_names = tuple(name for name in METRIC_FIELDS if name in outputs)
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **{k: v for k, v in extra.items() if v is not None}, **kwargs)
        if kwargs.get("output_router_logits"):
            raise NotImplementedError(
                "fastkto's TRL head does not compute MoE router auxiliary losses; set router_aux_loss_coef=0.0"
            )
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
        kwargs["use_cache"] = False
        # looked up on every call: FSDP, DeepSpeed and PEFT replace modules after the patch
        hidden = get_backbone(self)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = get_lm_head(self, temperature=temperature)
        device = head.weight.device.type
        # the head's matmul inputs: float32 when asked; under autocast its dtype (what fastkto.fused_logprobs and
        # nn.Linear would use there); else the head's dtype. Decided once here so that the log-probs and the metric
        # pass see the same inputs; autocast is then switched off (fastkto accumulates in float32 itself).
        dtype = head.weight.dtype
        if cast_lm_head_to_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        if dtype != head.weight.dtype:
            if _is_partitioned(head.weight):
                raise NotImplementedError(
                    f"the LM head is DeepSpeed ZeRO-3 partitioned in {head.weight.dtype} and the head was asked to "
                    f"run in {dtype} (cast_lm_head_to_fp32 or autocast): let DeepSpeed hold the model in the dtype "
                    "to score in (its bf16 / fp16 settings), or turn cast_lm_head_to_fp32 off"
                )
            bias = None if head.bias is None else head.bias.to(dtype)
            head = dataclasses.replace(head, weight=head.weight.to(dtype), bias=bias)
        # the backbone may end on another device than the head (device_map)
        hidden, labels = hidden.to(head.weight.device, dtype), labels.to(head.weight.device)
        mask = labels != -100
        with torch.autocast(device, enabled=False):
            log_probs = head.logprobs(hidden, labels)
            metrics = _metric_fields(head, hidden.detach(), labels, mask, metric_names, metrics_workspace_bytes)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, label_mask=mask, **metrics)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, True)


@contextlib.contextmanager
def _fastkto_head_for(module):
    """Let a TRL trainer module's ``__init__`` install fastkto's head where it calls ``add_fused_lm_head``."""
    original = module.add_fused_lm_head
    module.add_fused_lm_head = add_fastkto_lm_head
    try:
        yield
    finally:
        module.add_fused_lm_head = original


def _check_installed(trainer) -> None:
    """Fail loudly if TRL changed how it installs its head and the fastkto one was not put in place."""
    models = [trainer.model] + ([trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else [])
    for model in models:
        inner = unwrap_model(getattr(model, "module", model))
        if not getattr(inner, _MARK, False):
            raise RuntimeError(
                f"{type(trainer).__name__}: TRL did not install its LM head through add_fused_lm_head, so fastkto's "
                "head is not in use; this TRL version is not supported by fastkto.integrations.trl"
            )


class FastKTOTrainer(KTOTrainer):
    """``trl.KTOTrainer`` with fastkto computing every log-probability (policy, reference, KL pairs).

    Same constructor, ``KTOConfig``, loss and logged metrics as ``KTOTrainer``; only the LM head differs.
    """

    def __init__(self, *args, **kwargs):
        with _fastkto_head_for(_kto_module):
            super().__init__(*args, **kwargs)
        _check_installed(self)


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with fastkto computing every log-probability (policy and reference).

    Same constructor, ``DPOConfig``, losses and logged metrics as ``DPOTrainer``; only the LM head differs.
    """

    def __init__(self, *args, **kwargs):
        with _fastkto_head_for(_dpo_module):
            super().__init__(*args, **kwargs)
        _check_installed(self)
