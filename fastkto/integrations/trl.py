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

The metric fields TRL asks for on the policy (``entropy``, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``)
need the whole distribution of each scored token: they are computed in row chunks whose logits fit
``metrics_workspace_bytes`` (default 64 MiB), which costs one extra no-grad pass through the head. ``entropy`` is
computed in max-shifted form (a sum of non-negative terms, so float32 loses nothing to cancellation) and, like TRL's, is
differentiable: its backward recomputes each chunk's logits (nothing of size tokens x vocabulary is kept); KTO and
DPO log it detached, so that backward never runs there. MoE models: the router auxiliary loss is computed as TRL's
head computes it (transformers' ``load_balancing_loss_func`` on the backbone's router logits, returned as
``aux_loss`` and added to ``loss`` with the config's ``router_aux_loss_coef``). PEFT prompt learning (prompt tuning,
p-tuning) works: PEFT prepends its virtual tokens and then calls the base model, where this head sits.

Not supported, and refused: an adapter on the LM head; casting a ZeRO-3 partitioned head to another dtype
(``cast_lm_head_to_fp32``; see ``fastkto.integrations.transformers``); a gradient through ``entropy`` with a ZeRO-3
partitioned head (raised in that backward, the only place it is known to be needed).
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
from .transformers import _backbone_module, _is_partitioned, _unwrap, backbone_outputs, get_lm_head, use_varlen_sdpa

__all__ = ["add_fastkto_lm_head", "FastKTOTrainer", "FastDPOTrainer", "METRIC_FIELDS"]

METRIC_FIELDS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
_MARK = "_fastkto_lm_head"
_METRICS_WORKSPACE = 64 << 20


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


def _chunk_rows(head, workspace_bytes: int) -> int:
    vocab = head.weight.ds_shape[0] if _is_partitioned(head.weight) else head.weight.shape[0]
    return max(1, workspace_bytes // (3 * 4 * vocab))  # logits, probabilities and one temporary, fp32


def _entropy_rows(rows, head, chunk):
    """(M, D) rows -> (M,) float32 entropies under ``head``, ``chunk`` rows of logits at a time, without grad."""
    with torch.no_grad():
        parts = [_entropy(head.logits(rows[s : s + chunk])) for s in range(0, rows.shape[0], chunk)]
    return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)


def _entropy_rows_backward(rows, weight, bias, head, chunk, grad, need):
    """Gradients of sum(grad * entropy(rows)) w.r.t. (rows, weight, bias) (None where ``need`` says so), each chunk's
    logits recomputed: nothing of size M x V is kept. With z the transformed logits (soft-cap c, temperature T) and
    p = softmax(z), H = -sum p log p:

        dH/dz_j = -p_j (log p_j + H)        da_j = dH/dz_j (1 - tanh^2(a_j / c)) / T    (a = h.W^T + b)

    then dh = da @ W, dW = da^T @ h, db = sum da, in float32 (written out rather than taken from autograd, which
    an operator's implementation runs below)."""
    need_h, need_w, need_b = need
    w32 = weight.float()
    d_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    d_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b and bias is not None else None
    for s in range(0, rows.shape[0], chunk):
        h = rows[s : s + chunk].float()
        a = h @ w32.T
        if bias is not None:
            a = a + bias.float()
        t = None if head.softcap is None else torch.tanh(a / head.softcap)
        z = (a if t is None else head.softcap * t) / head.temperature
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        entropy = -(p * logp).sum(-1, keepdim=True)
        da = p * (logp + entropy) * (-grad[s : s + chunk].float()[:, None] / head.temperature)
        if t is not None:
            da = da * (1 - t * t)
        if d_rows is not None:
            d_rows[s : s + chunk] = da @ w32
        if d_weight is not None:
            d_weight.addmm_(da.T, h)
        if d_bias is not None:
            d_bias += da.sum(0)
    return [None if g is None else g.to(t.dtype) for g, t in zip((d_rows, d_weight, d_bias), (rows, weight, bias),
                                                                  strict=True)]


class _PartitionedEntropy(torch.autograd.Function):
    """The entropy field with a DeepSpeed ZeRO-3 partitioned head (whose logits gather the weight through the
    head module's hooks, which an operator cannot run): forward only."""

    @staticmethod
    def forward(ctx, rows, weight, bias, head, chunk):
        return _entropy_rows(rows, head, chunk)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(
            "a gradient through fastkto's entropy field with a DeepSpeed ZeRO-3 partitioned LM head is not "
            "supported (KTO and DPO log the entropy detached and never need it)"
        )


def _metric_fields(head, hidden, labels, mask, fields, workspace_bytes):
    """Per-token metric fields (mask's shape, zero where masked) from the full distribution, in row chunks.
    ``entropy`` is differentiable (through hidden and the head); the other fields carry no gradient. One operator
    (``fastkto::token_metrics``), so that torch.compile sees one node and no data-dependent shape."""
    if not fields:
        return {}
    chunk = _chunk_rows(head, workspace_bytes)
    if _is_partitioned(head.weight) or _is_partitioned(head.bias):
        return _masked_fields(head, hidden, labels, mask, fields, chunk)
    flat = torch.ops.fastkto.token_metrics(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, labels.reshape(-1), mask.reshape(-1),
        head.softcap, float(head.temperature), chunk, *(name in fields for name in METRIC_FIELDS))
    return {name: t.reshape(mask.shape) for name, t in zip(METRIC_FIELDS, flat, strict=True) if name in fields}


def _masked_fields(head, hidden, labels, mask, fields, chunk):
    """``_metric_fields`` on the scored rows only (compacted by ``mask``), eagerly."""
    out = {
        name: torch.zeros(mask.shape, device=hidden.device, dtype=torch.bool if name == "is_top1" else torch.float32)
        for name in fields
    }
    if not bool(mask.any()):
        return out
    if "entropy" in fields:
        # masked_scatter keeps the graph to the scattered rows (and so to hidden, weight and bias)
        if _is_partitioned(head.weight) or _is_partitioned(head.bias):
            entropy = _PartitionedEntropy.apply(hidden[mask], head.weight, head.bias, head, chunk)
        else:
            entropy = _entropy_rows(hidden[mask], head, chunk)
        out["entropy"] = out["entropy"].masked_scatter(mask, entropy)
    others = tuple(name for name in fields if name != "entropy")
    if not others:
        return out
    with torch.no_grad():
        _no_grad_fields(head, hidden.detach()[mask], labels[mask], mask, others, chunk, out)
    return out


def _no_grad_fields(head, rows, targets, mask, fields, chunk, out):
    parts = {name: [] for name in fields}
    for start in range(0, rows.shape[0], chunk):
        z = head.logits(rows[start : start + chunk])
        lse = torch.logsumexp(z, dim=-1)
        if "mean_logits" in fields:
            parts["mean_logits"].append(z.mean(-1))
        if "is_top1" in fields:  # argmax returns the first maximum, as TRL counts ties
            parts["is_top1"].append(z.argmax(-1) == targets[start : start + chunk])
        if "log_sum_sq_probs" in fields:
            parts["log_sum_sq_probs"].append(torch.logsumexp(2 * z, dim=-1) - 2 * lse)
    for name in fields:
        out[name][mask] = torch.cat(parts[name])

# ------------------------------------------------------------------------------------- the metric fields' operator
@torch.library.custom_op("fastkto::token_metrics", mutates_args=())
def _token_metrics(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                   mask: torch.Tensor, softcap: float | None, temperature: float, chunk: int, entropy: bool,
                   mean_logits: bool, is_top1: bool, log_sum_sq_probs: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, D), weight (V, D), bias, labels (N,), mask (N,) bool -> the ``METRIC_FIELDS`` (N,) each (is_top1
    bool, the others float32), zero where masked; a field not asked for is an empty (0,) tensor."""
    from .transformers import LMHead

    head = LMHead(weight=weight, bias=bias, softcap=softcap, temperature=temperature)
    wanted = tuple(name for name, on in zip(METRIC_FIELDS, (entropy, mean_logits, is_top1, log_sum_sq_probs),
                                            strict=True) if on)
    with torch.autocast(hidden.device.type, enabled=False):
        out = _masked_fields(head, hidden, labels, mask, wanted, chunk)
    return tuple(out[name] if name in out else
                 hidden.new_zeros(0, dtype=torch.bool if name == "is_top1" else torch.float32) for name in METRIC_FIELDS)


@_token_metrics.register_fake
def _(hidden, weight, bias, labels, mask, softcap, temperature, chunk, entropy, mean_logits, is_top1,
      log_sum_sq_probs):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n if on else 0, dtype=torch.bool if name == "is_top1" else torch.float32)
                 for name, on in zip(METRIC_FIELDS, (entropy, mean_logits, is_top1, log_sum_sq_probs), strict=True))


@torch.library.custom_op("fastkto::token_entropy_backward", mutates_args=())
def _token_entropy_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            mask: torch.Tensor, softcap: float | None, temperature: float, chunk: int,
                            need_hidden: bool, need_weight: bool, need_bias: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad * entropy) (the masked rows' entropies) w.r.t. (hidden (N, D), weight, bias), in their
    dtypes; one not needed is an empty (0,) tensor."""
    from .transformers import LMHead

    head = LMHead(weight=weight, bias=bias, softcap=softcap, temperature=temperature)
    with torch.autocast(hidden.device.type, enabled=False):
        d_rows, d_weight, d_bias = _entropy_rows_backward(hidden[mask], weight, bias, head, chunk, grad[mask].float(),
                                                          (need_hidden, need_weight, need_bias and bias is not None))
    d_hidden = None if d_rows is None else hidden.new_zeros(hidden.shape).index_put_((mask,), d_rows)
    return tuple(hidden.new_zeros(0) if g is None else g.contiguous() for g in (d_hidden, d_weight, d_bias))


@_token_entropy_backward.register_fake
def _(grad, hidden, weight, bias, mask, softcap, temperature, chunk, need_hidden, need_weight, need_bias):
    def like(t, on):
        return t.new_empty(t.shape) if on and t is not None else hidden.new_empty(0)

    return like(hidden, need_hidden), like(weight, need_weight), like(bias, need_bias)


def _metrics_setup_context(ctx, inputs, output):
    hidden, weight, bias, _, mask, softcap, temperature, chunk, *_ = inputs
    ctx.save_for_backward(hidden, weight, bias, mask)
    ctx.options = (softcap, temperature, chunk)


def _metrics_backward(ctx, grad_entropy, *_):
    hidden, weight, bias, mask = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_entropy is None or grad_entropy.numel() == 0 or not (need_h or need_w or need_b):
        return (None,) * 12
    grads = torch.ops.fastkto.token_entropy_backward(grad_entropy, hidden, weight, bias, mask, *ctx.options, need_h,
                                                     need_w, need_b and bias is not None)
    return tuple(g if n else None for g, n in zip(grads, (need_h, need_w, need_b), strict=True)) + (None,) * 9


torch.library.register_autograd("fastkto::token_metrics", _metrics_backward, setup_context=_metrics_setup_context)


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
        outputs: per-token fields to fill: "log_probs" always, plus any of ``METRIC_FIELDS`` (computed without
            gradient, see the module docstring).
        metrics_workspace_bytes: logits budget of the metric pass.
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
        # looked up on every call: FSDP, DeepSpeed and PEFT replace modules after the patch
        backbone = _backbone_module(self)  # inside the model's own call: its wrappers have run
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
            metrics = _metric_fields(head, hidden, labels, mask, metric_names, metrics_workspace_bytes)
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
        num_experts = getattr(text_config, "num_local_experts", None) or getattr(model, "num_experts")
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
