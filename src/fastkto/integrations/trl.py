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

The metric fields TRL asks for (``entropy``, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``) need the whole
distribution of each scored token: they come from the same pass through the head as the log-probs
(``fastkto.token_stats``: the forward's online log-sum-exp carries their sums), on the policy and the reference
alike, so a forward costs one pass (2 N D V flops) and a forward + backward four. ``entropy`` is computed in
max-shifted form (a sum of non-negative terms, so float32 loses nothing to cancellation) and, like TRL's, is
differentiable: its gradient joins the log-probs' in the same backward tiles (KTO and DPO log it detached, so
there it costs nothing). MoE models: the router auxiliary loss is computed as TRL's
head computes it (transformers' ``load_balancing_loss_func`` on the backbone's router logits, returned as
``aux_loss`` and added to ``loss`` with the config's ``router_aux_loss_coef``). PEFT prompt learning (prompt tuning,
p-tuning) works: PEFT prepends its virtual tokens and then calls the base model, where this head sits.

Not supported, and refused: an adapter on the LM head; casting a ZeRO-3 partitioned head to another dtype
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

from ..packing import pack_padded
from .transformers import (
    _as_module_forward,
    _backbone_module,
    _is_partitioned,
    _unwrap,
    backbone_outputs,
    get_lm_head,
    use_varlen_sdpa,
)

__all__ = ["add_fastkto_lm_head", "head_token_stats", "FastKTOTrainer", "FastDPOTrainer", "METRIC_FIELDS"]

METRIC_FIELDS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
_MARK = "_fastkto_lm_head"
_METRICS_WORKSPACE = 64 << 20  # accepted for compatibility: the fields now come from the log-prob pass


def _entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the last dimension, in z's dtype, without cancellation.

    With z' = z - max(z) <= 0 and s = sum exp(z') >= 1: H = log s + sum exp(z') (-z') / s, a sum of two terms
    >= 0, each a sum of terms of one sign. The textbook ``lse - sum(p z)`` subtracts two numbers of the logits' size
    (~30-40 for a real LM) and loses ~1e-3 in float32 (measured on SmolLM2: 9.5e-4, this form 1e-5 or less).
    H does not depend on the shift, so the max is detached (exact, and no gradient through argmax).
    """
    shifted = z - z.detach().amax(dim=-1, keepdim=True)
    e = shifted.exp()
    total = e.sum(-1)
    return total.log() - (e * shifted).sum(-1) / total


def head_token_stats(head, hidden: torch.Tensor, labels: torch.Tensor, fields: tuple[str, ...]) -> dict:
    """``fastkto.token_stats`` through an ``LMHead``: {field: tensor of labels' shape} from one pass through the head
    (log-probs and entropy differentiable). A DeepSpeed ZeRO-3 partitioned head runs inside its module's hooks,
    as ``LMHead.logprobs`` does, so that its weight is gathered there and its gradient reduce-scattered."""
    from ..logprob import token_stats

    hidden = hidden if hidden.dtype == head.weight.dtype else hidden.to(head.weight.dtype)
    if _is_partitioned(head.weight) or _is_partitioned(head.bias):
        if head.module is None:
            raise ValueError("the LM head's weight is DeepSpeed ZeRO-3 partitioned and this LMHead has no module to "
                             "gather it with: build it with get_lm_head(model)")
        module = head.module

        def run(h):  # a tuple, which the module hooks know how to walk
            got = token_stats(h, module.weight, labels, fields, bias=None if head.bias is None else module.bias,
                              softcap=head.softcap, temperature=head.temperature)
            return tuple(got[name] for name in fields)

        return dict(zip(fields, _as_module_forward(module, run, hidden), strict=True))
    return token_stats(hidden, head.weight, labels, fields, bias=head.bias, softcap=head.softcap,
                       temperature=head.temperature)


def _metric_fields(head, hidden, labels, mask, fields, workspace_bytes=None):
    """The per-token metric fields (labels' shape, zero where ``labels`` is -100) of ``fields``, from the log-prob
    pass's statistics (``head_token_stats``); ``entropy`` is differentiable. ``mask`` and ``workspace_bytes`` are
    kept for callers of the earlier chunked metric pass: the mask is ``labels != -100``, and the pass's buffers are
    fastkto's workspace."""
    if not fields:
        return {}
    return head_token_stats(head, hidden, labels, tuple(fields))


def add_fastkto_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    metrics_workspace_bytes: int = _METRICS_WORKSPACE,
    padding_free: bool = False,
) -> None:
    """Patch ``model`` so ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``
    with ``log_probs`` computed by fastkto. A drop-in for ``trl.trainer.utils.add_fused_lm_head``.

    Args:
        model: a transformers causal LM (patch it before PEFT wraps it, or pass ``peft_model.get_base_model()``).
        temperature: divides the logits (after the model's own logit transform).
        cast_lm_head_to_fp32: score in float32 (hidden states and head weight upcast), even under autocast.
        outputs: per-token fields to fill: "log_probs" always, plus any of ``METRIC_FIELDS``, all from the one
            pass through the head that computes the log-probs (``fastkto.token_stats``; see the module docstring).
        metrics_workspace_bytes: accepted for compatibility with the earlier separate metric pass; unused.
        padding_free: run the backbone on the batch's rows packed into one sequence (the padding removed,
            ``fastkto.integrations.transformers.backbone_outputs``: position ids restarting per row, attention kept
            within each row), then put the hidden states back in the padded layout for the head, so every output
            keeps the padded batch's shape. The batch must be right-padded (TRL's text collators pad right). A
            model on SDPA attention is switched to fastkto's varlen SDPA (``use_varlen_sdpa``).

    Forward with ``fused_lm_head=True``: ``labels`` (B, T) with -100 on unscored positions are shifted here (hidden
    state t scores label t + 1) unless ``shift_labels`` (B, T) is given already shifted; returns per-token fields of
    shape (B, T - 1) (or (B, T)), zero where masked, and ``loss`` = -sum(log_probs) / (number of scored tokens or
    ``num_items_in_batch``). Without it, the forward is the original one (generation is unchanged).
    """
    unknown = set(outputs) - {"log_probs", *METRIC_FIELDS}
    if unknown:
        raise ValueError(f"outputs may only name 'log_probs' and {METRIC_FIELDS}; got {sorted(unknown)}")
    metric_names = tuple(name for name in METRIC_FIELDS if name in outputs)
    if padding_free and getattr(_unwrap(model, allow_prompt_learning=True).config, "_attn_implementation",
                                None) == "sdpa":
        use_varlen_sdpa(model)  # per-sequence SDPA instead of a dense (T_total x T_total) mask
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **{k: v for k, v in extra.items() if v is not None}, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
        kwargs["use_cache"] = False
        # MoE models: like the model's own forward (and TRL's head), request router logits when the config asks
        text_config = self.config.get_text_config()
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_out, hidden, labels = _backbone_hidden(self, args, kwargs, labels, shift_labels, padding_free)
        head = _scoring_head(self, temperature, cast_lm_head_to_fp32)
        # the backbone may end on another device than the head (device_map)
        hidden, labels = hidden.to(head.weight.device, head.weight.dtype), labels.to(head.weight.device)
        mask = labels != -100
        log_probs, metrics = _score(head, hidden, labels, metric_names)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            # packed, every token the router saw is a real one: no mask, the same mean as the padded batch's
            mask_for_aux = None if padding_free else kwargs.get("attention_mask")
            aux_loss = _router_aux_loss(self, text_config, backbone_out, mask_for_aux)
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=aux_loss, **metrics)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, True)


def _backbone_hidden(model, args, kwargs, labels, shift_labels, padding_free: bool):
    """(the backbone's output, hidden states, labels) of one fused-head forward, aligned so that hidden state t
    scores label t: ``labels`` (B, T) are shifted here (hidden states (B, T - 1, D)), ``shift_labels`` (B, T)
    are taken as given. ``padding_free`` runs the backbone packed (``_packed_backbone``)."""
    # looked up on every call: FSDP, DeepSpeed and PEFT replace modules after the patch
    backbone = _backbone_module(model)  # inside the model's own call: its wrappers have run
    if padding_free:
        backbone_out, hidden, keep = _packed_backbone(backbone, args, kwargs)
        # hidden state t scores shift_labels[t] = labels[t + 1]; at padding it is 0, so nothing may be scored there
        given, real = (shift_labels, keep) if shift_labels is not None else (labels[:, 1:], keep[:, :-1])
        if tuple(given.shape) != tuple(real.shape) or bool((given[~real] != -100).any()):
            raise ValueError("padding_free: labels must have the batch's (B, T) shape and be -100 on padding "
                             "positions (they have no token to score)")
    else:
        backbone_out = backbone(*args, **kwargs)
        hidden = backbone_out.last_hidden_state
    if shift_labels is None:
        return backbone_out, hidden[:, :-1], labels[:, 1:]
    return backbone_out, hidden, shift_labels


def _scoring_head(model, temperature: float, cast_lm_head_to_fp32: bool):
    """The model's ``LMHead`` in the dtype its matmul inputs take: float32 when asked; under autocast the autocast
    dtype (what ``fastkto.fused_logprobs`` and ``nn.Linear`` would use there); else the head's own dtype. Decided
    once per forward so that the log-probs and the metric fields see the same inputs."""
    head = get_lm_head(model, temperature=temperature)
    device = head.weight.device.type
    dtype = head.weight.dtype
    if cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    if dtype == head.weight.dtype:
        return head
    if _is_partitioned(head.weight):
        raise NotImplementedError(
            f"the LM head is DeepSpeed ZeRO-3 partitioned in {head.weight.dtype} and the head was asked to "
            f"run in {dtype} (cast_lm_head_to_fp32 or autocast): let DeepSpeed hold the model in the dtype "
            "to score in (its bf16 / fp16 settings), or turn cast_lm_head_to_fp32 off"
        )
    bias = None if head.bias is None else head.bias.to(dtype)
    return dataclasses.replace(head, weight=head.weight.to(dtype), bias=bias)


def _score(head, hidden, labels, metric_names: tuple[str, ...]) -> tuple[torch.Tensor, dict]:
    """(per-token log-probs, {metric field: tensor}) of labels' shape, from one pass through ``head``, with
    autocast off (the inputs are already in the head's dtype; fastkto accumulates in float32 itself)."""
    with torch.autocast(head.weight.device.type, enabled=False):
        if not metric_names:
            return head.logprobs(hidden, labels), {}
        metrics = head_token_stats(head, hidden, labels, ("log_probs", *metric_names))
    return metrics.pop("log_probs"), metrics


def _packed_backbone(backbone, args, kwargs):
    """Run ``backbone`` on a right-padded (B, T) batch with its rows packed into one sequence.

    Returns (the backbone's output, its last hidden states back in the padded (B, T, D) layout with zeros on the
    padding, the (B, T) bool mask of real tokens). ``kwargs`` are the forward's: input_ids or inputs_embeds,
    attention_mask, and options passed on unchanged.
    """
    kwargs = dict(kwargs)
    if args:
        raise ValueError("padding_free: pass the batch as keyword arguments (input_ids=..., attention_mask=...)")
    if kwargs.get("position_ids") is not None:
        raise ValueError("padding_free computes the packed position ids itself; do not pass position_ids")
    mask = kwargs.pop("attention_mask", None)
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    tokens = ids if ids is not None else embeds
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        raise ValueError("padding_free needs input_ids (B, T) or inputs_embeds (B, T, D)")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    cu_seqlens, position_ids, packed = pack_padded(mask, tokens)
    given = {"input_ids": packed} if ids is not None else {"inputs_embeds": packed}
    out = backbone_outputs(backbone, given.pop("input_ids", None), None, position_ids=position_ids,
                           cu_seqlens=cu_seqlens, **given, **kwargs)
    keep = mask != 0
    flat = out.last_hidden_state
    hidden = flat.new_zeros((*keep.shape, flat.shape[-1])).masked_scatter(keep[..., None], flat)
    return out, hidden, keep


def _router_aux_loss(model, text_config, backbone_out, attention_mask):
    """The MoE load-balancing loss of the backbone's router logits, as TRL 1.16's head computes it (Mixtral's
    ``load_balancing_loss_func``, which every MoE family in transformers shares), without the coefficient."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    router_logits = getattr(backbone_out, "router_logits", None)
    if router_logits is None:
        raise ValueError(
            f"output_router_logits=True but {type(model).__name__}'s backbone returned no router_logits, so there is "
            "no auxiliary loss to compute; set router_aux_loss_coef=0.0 in the trainer's config"
        )
    num_experts = getattr(text_config, "num_experts", None)
    if num_experts is None:  # gpt-oss names it num_local_experts (transformers < 5.6 had no alias)
        num_experts = getattr(text_config, "num_local_experts", None) or model.num_experts
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


@contextlib.contextmanager
def _fastkto_head_for(module, padding_free: bool = False):
    """Let a TRL trainer module's ``__init__`` install fastkto's head where it calls ``add_fused_lm_head``."""
    original = module.add_fused_lm_head
    module.add_fused_lm_head = functools.partial(add_fastkto_lm_head, padding_free=padding_free)
    try:
        yield
    finally:
        module.add_fused_lm_head = original


def _check_installed(trainer) -> None:
    """Fail loudly if TRL changed how it installs its head and the fastkto one was not put in place."""
    models = [trainer.model] + ([trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else [])
    for model in models:
        # prompt learning is fine here: PEFT prepends its virtual tokens, then calls the base model holding the head
        inner = _unwrap(getattr(model, "module", model), allow_prompt_learning=True)
        if not getattr(inner, _MARK, False):
            raise RuntimeError(
                f"{type(trainer).__name__}: TRL did not install its LM head through add_fused_lm_head, so fastkto's "
                "head is not in use; this TRL version is not supported by fastkto.integrations.trl"
            )


def _check_padding_free(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"padding_free must be a bool, got {type(value).__name__}")
    return value


class FastKTOTrainer(KTOTrainer):
    """``trl.KTOTrainer`` with fastkto computing every log-probability (policy, reference, KL pairs).

    Same constructor, ``KTOConfig``, loss and logged metrics as ``KTOTrainer``; only the LM head differs. One extra
    keyword, ``padding_free=True`` (TRL's KTOTrainer has no such mode): every forward through the head (policy,
    reference, KL pairs) runs the backbone on the batch's rows packed into one sequence, without their padding
    (see ``add_fastkto_lm_head``); the batches, losses and metrics are the padded ones, to float32 rounding.
    """

    def __init__(self, *args, padding_free: bool = False, **kwargs):
        self.padding_free = _check_padding_free(padding_free)
        with _fastkto_head_for(_kto_module, padding_free):
            super().__init__(*args, **kwargs)
        _check_installed(self)


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with fastkto computing every log-probability (policy and reference).

    Same constructor, ``DPOConfig``, losses and logged metrics as ``DPOTrainer``; only the LM head differs.
    ``DPOConfig(padding_free=True)``, which TRL 1.16 switches off with a warning (its padding-free path awaits a
    rewrite), is honoured here: the policy and reference forwards run the backbone on the rows packed into one
    sequence without their padding (see ``add_fastkto_lm_head``), with any attention implementation that keeps
    packed rows apart (eager, SDPA, flex or flash-attention; others raise), not only flash-attention.
    """

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)  # (model, ref_model, args, ...)
        padding_free = _check_padding_free(bool(getattr(config, "padding_free", False)))
        if padding_free:
            config.padding_free = False  # TRL would warn that it falls back to padding; fastkto packs instead
        try:
            with _fastkto_head_for(_dpo_module, padding_free):
                super().__init__(*args, **kwargs)
        finally:
            if padding_free:
                config.padding_free = True
        self.padding_free = padding_free
        _check_installed(self)
