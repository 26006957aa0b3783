"""Hidden states and LM head of any ``transformers`` causal LM, so that fastkto never needs its logits.

A causal LM computes ``logits = transform(hidden @ W.T + b)`` where ``hidden`` is the backbone's last hidden state
and ``transform`` is the identity for most models. This module gets the pieces:

* ``hidden_states(model, input_ids, ...)`` / ``backbone_outputs``: the output of ``model.base_model`` (the module
  named by ``base_model_prefix``: ``model.model`` for Llama, ``model.transformer`` for GPT-2), without the LM
  head's work. A wrapper whose call matters (DDP, FSDP1, an FSDP2 root, a DeepSpeed engine, ``torch.compile``,
  ``model.compile()``) is called itself, never bypassed; ``get_backbone(model)`` (the module) refuses such wrappers.
  A tied embedding / LM head split into two parameters (e.g. by FSDP2 units) raises ValueError.
* ``get_lm_head(model)``: an ``LMHead`` holding the head's weight (the input embeddings when tied), its bias, and
  the transform expressed as fastkto's ``softcap`` and ``temperature``:

  ============================  ==============================  =================================================
  config attribute              model computes                  fastkto arguments
  ============================  ==============================  =================================================
  final_logit_softcapping = c   c tanh(a / c)  (Gemma-2/3)      softcap = c
  logit_scale = s               s a  (Cohere, Cohere2)          temperature = 1 / s
  logits_scaling = d            a / d  (Granite family,         temperature = d
                                MiniCPM3; HyperCLOVA X
                                multiplies: temperature 1 / d)
  lm_head_multiplier = s        s a  (Falcon-H1)                temperature = 1 / s
  output_multiplier = s         s a                             temperature = 1 / s
  ============================  ==============================  =================================================

  A scale s applied before a soft-cap c is the same as soft-cap c / s and temperature 1 / s:
  c tanh(s a / c) = [(c / s) tanh(a / (c / s))] / (1 / s). A sampling temperature T divides on top of that.
  fastkto's arguments apply as ``fastkto.reference.LOGIT_TRANSFORMS`` says (bias, soft-cap, temperature).

Then ``head.logprobs(hidden, labels)`` equals ``log_softmax(model(input_ids).logits)`` gathered at the labels
(``verify_lm_head`` checks exactly that on a small input, for architectures not in the table).

PEFT / LoRA: pass the ``PeftModel``; adapters in the backbone are active unless disabled, so the reference pass is
``with model.disable_adapter(): ref_hidden = hidden_states(model, ...)``. An adapter on the LM head itself is
refused (its weight would be read without the adapter). Gradient checkpointing (``model.gradient_checkpointing_
enable()``) lives inside the backbone's layers and works unchanged.

DeepSpeed ZeRO-3: a partitioned head weight (``ds_status`` not AVAILABLE) is used the way DeepSpeed uses it for the
model's own head: the log-probabilities are computed as the head module's forward (``LMHead.module`` is called with
its ``forward`` swapped for fastkto's for that one call), so DeepSpeed's module hooks gather the weight for the
forward, release it, gather it again for the backward and reduce-scatter its gradient into this rank's partition.
A trainable head and a frozen one (LoRA) both work; tested with deepspeed 0.19.8 ZeRO-3 on 2 CPU processes (gloo)
against one process on the whole batch. Use ``get_lm_head(model)`` (it records the module) and the loss math of
``fastkto.loss`` on the log-probabilities it returns.

The other jobs live beside this module and are re-exported here under their old names: packed batches and the
varlen SDPA in ``packed_attention``, ZeRO-3 parameters in ``zero3``, GGUF loading in ``gguf``.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field

import torch

from .. import packing, reference
from .._checks import check_integer_tensor
from ..distributed import gather_sharded
from ..logprob import _packed_lengths, fused_logprobs, sequence_logps
from .gguf import load_gguf_model, plain_model
from .packed_attention import VARLEN_SDPA, PackedMaskRecorder, packed_layout, run_packed, use_varlen_sdpa
from .zero3 import as_module_forward, gathered_parameters, is_partitioned

# the names these jobs had when they lived in this module (fastkto.integrations.trl and the tests import them)
_is_partitioned, _as_module_forward, _plain_model = is_partitioned, as_module_forward, plain_model
_packed_layout, _PackedMaskRecorder = packed_layout, PackedMaskRecorder

__all__ = [
    "LMHead",
    "unwrap_model",
    "get_backbone",
    "get_lm_head",
    "logit_transform",
    "hidden_states",
    "backbone_outputs",
    "use_varlen_sdpa",
    "VARLEN_SDPA",
    "verify_lm_head",
    "gathered_parameters",
    "is_partitioned",
    "backbone_module",
    "load_gguf_model",
]

# (config attribute, True if the model multiplies the logits by it, False if it divides)
_SCALES = (("logit_scale", True), ("lm_head_multiplier", True), ("output_multiplier", True))
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


# --------------------------------------------------------------------------------------------------- model lookup
def _peft_model(model):
    """The PeftModel if ``model`` is one (PEFT is optional), else None."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return model if isinstance(model, PeftModel) else None


def unwrap_model(model: torch.nn.Module, *, allow_prompt_learning: bool = False) -> torch.nn.Module:
    """The ``transformers`` model inside DDP / FSDP-style ``.module`` wrappers, ``torch.compile`` and PEFT.

    Raises ValueError for a prompt-learning PEFT model unless ``allow_prompt_learning``: running its backbone
    directly would skip the virtual tokens (a caller that runs the PeftModel itself, as TRL's trainers do, may
    allow it).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for level in _wrapper_chain(model):  # the last, innermost level is the answer
        peft = _peft_model(level)
        if peft is not None:
            config = peft.peft_config.get(peft.active_adapter)
            if not allow_prompt_learning and config is not None and getattr(config, "is_prompt_learning", False):
                raise ValueError(
                    "prompt-learning PEFT methods (prefix / prompt tuning) inject virtual tokens in PeftModel.forward, "
                    "which running the backbone directly would skip; use an adapter method such as LoRA"
                )
    return level


def _wrapper_chain(model: torch.nn.Module):
    """``model``, then each model inside it, outermost first: a PEFT model's base model, ``torch.compile``'s
    ``_orig_mod``, a ``.module`` wrapper's module (DDP, FSDP1, a DeepSpeed engine); the last is the innermost."""
    yield model
    for _ in range(8):  # wrappers nest a few levels at most
        peft = _peft_model(model)
        if peft is not None:
            model = peft.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif _is_module_wrapper(model):
            model = model.module
        else:
            return
        yield model


def _is_module_wrapper(model: torch.nn.Module) -> bool:
    """A ``.module`` wrapper (DDP, FSDP1, a DeepSpeed engine), not a model that happens to have a ``module``."""
    inner = getattr(model, "module", None)
    if not isinstance(inner, torch.nn.Module):
        return False
    # a DeepSpeed engine forwards unknown attributes (config, ...) to its module: recognise it by type
    deepspeed = sys.modules.get("deepspeed")
    engine = getattr(deepspeed, "DeepSpeedEngine", None) if deepspeed is not None else None
    # FSDP1 forwards unknown attributes (config, ...) to its module too
    return (isinstance(engine, type) and isinstance(model, engine)) or _is_fsdp1(model) or not hasattr(model, "config")


def _is_ddp(model: torch.nn.Module) -> bool:
    """``DistributedDataParallel`` anywhere in ``model``'s chain of wrappers (it may sit inside ``torch.compile``)."""
    ddp = getattr(sys.modules.get("torch.nn.parallel"), "DistributedDataParallel", None)
    return isinstance(ddp, type) and any(isinstance(level, ddp) for level in _wrapper_chain(model))


def _is_fsdp1(model: torch.nn.Module) -> bool:
    """``FullyShardedDataParallel`` (FSDP1), recognised by type without importing torch.distributed."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None) if fsdp is not None else None
    return isinstance(cls, type) and isinstance(model, cls)


class _AfterRootOutput(torch.autograd.Function):
    """Returns ``hidden`` as is; its backward also hands ``root_output`` (the head's (B, 0, V) logits) a zero
    gradient, which costs nothing. FSDP1 starts its backward from hooks on the root's forward outputs (it then
    marks the root's parameters as in backward and queues the callback that waits for the gradient reductions);
    the loss reaches the model through the backbone's output, not the root's, so without this those hooks would
    never fire and the root's post-backward hook would find its parameters still in forward. DDP with
    ``static_graph=True`` likewise queues its first iteration's delayed all-reduce from a node on its outputs
    (``_DDPSink``): without this the ranks kept their own gradients, silently."""

    @staticmethod
    def forward(ctx, hidden, root_output):
        ctx.root_shape = root_output.shape
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.root_shape)


def _wrappers(model: torch.nn.Module) -> list[str]:
    """Names of the wrappers around ``model``'s transformers model whose forward, hooks or compilation calling the
    backbone directly would skip: ``.module`` wrappers (DDP, FSDP1, a DeepSpeed engine), ``torch.compile``,
    ``model.compile()`` and an FSDP2 root (``fully_shard``). PEFT adapters live in the backbone's layers: not listed."""
    names = []
    for level in _wrapper_chain(model):
        if getattr(level, "_compiled_call_impl", None) is not None:
            names.append(f"{type(level).__name__}.compile()")
        if _is_fsdp2(level):
            names.append(f"fully_shard({type(level).__name__})")
        if _peft_model(level) is not None:
            continue
        if hasattr(level, "_orig_mod"):
            names.append("torch.compile")
        elif _is_module_wrapper(level):
            names.append(type(level).__name__)
    return names


def _is_fsdp2(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _root_resharded(root: torch.nn.Module) -> bool:
    """True if an FSDP2 root's own parameters (those of its modules outside any nested FSDP2 unit) are sharded
    DTensors right after its forward, i.e. the root resharded after forward."""
    from ..distributed import is_sharded

    todo = [root]
    while todo:
        module = todo.pop()
        if any(is_sharded(p) for p in module.parameters(recurse=False)):
            return True
        todo.extend(child for child in module.children() if not _is_fsdp2(child))
    return False


def backbone_module(model: torch.nn.Module) -> torch.nn.Module:
    """``model.base_model`` of the unwrapped transformers model: a lookup, whatever wraps ``model`` (to call it
    without bypassing a wrapper, use ``backbone_outputs``; ``get_backbone`` refuses wrappers whose call matters)."""
    inner = unwrap_model(model)
    backbone = getattr(inner, "base_model", None)
    if backbone is None or backbone is inner:
        raise ValueError(
            f"{type(inner).__name__} has no backbone to run without its LM head: expected a transformers causal LM "
            "whose base_model_prefix names the decoder (e.g. LlamaForCausalLM.model)"
        )
    return backbone


def get_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps input ids to the final hidden states (``model.base_model``), without the LM head.

    Calling it runs the backbone alone. So for a ``model`` behind a wrapper whose call matters (DDP's gradient
    sync, FSDP's unshard hooks, ``torch.compile`` / ``model.compile()``), this raises ValueError: run such a model
    with ``hidden_states(model, ...)`` or ``backbone_outputs(model, ...)``, which call the wrapper.
    """
    wrappers = _wrappers(model)
    if wrappers:
        raise ValueError(
            f"get_backbone: calling the backbone directly would bypass {', '.join(wrappers)} (no gradient sync / "
            "FSDP hooks / compilation). Run it with hidden_states(model, ...) or backbone_outputs(model, ...), "
            "which call the model you pass; to inspect the module only, read unwrap_model(model).base_model"
        )
    return backbone_module(model)


def _check_tie(inner: torch.nn.Module) -> None:
    """ValueError if the model declares a tied embedding / LM head but holds them as two parameters (FSDP2 units
    that split the tied pair, or a copy), which would train them apart."""
    config = getattr(inner, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False) or not getattr(inner, "_tied_weights_keys", None):
        return
    get_in, get_out = getattr(inner, "get_input_embeddings", None), getattr(inner, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return
    emb, head = get_in(), get_out()
    w_in, w_out = getattr(emb, "weight", None), getattr(head, "weight", None)
    if isinstance(w_in, torch.Tensor) and isinstance(w_out, torch.Tensor) and w_in is not w_out:
        raise ValueError(
            f"{type(inner).__name__} ties its input embeddings and LM head (config.tie_word_embeddings=True) but they "
            "are two different parameters here, which training would move apart. Under FSDP2 keep the tied weight "
            "in one unit: fully_shard each decoder layer, then fully_shard(model) at the root (not model.model and "
            "model.lm_head as units of their own); under DeepSpeed ZeRO-3, tie before deepspeed.initialize"
        )


def _head_module(inner: torch.nn.Module) -> torch.nn.Module:
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"{type(inner).__name__} has no LM head to find (get_output_embeddings() is None): fastkto needs a causal "
            "LM with a linear output layer, e.g. AutoModelForCausalLM"
        )
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        if isinstance(head, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            raise ValueError(
                "a PEFT adapter or modules_to_save on the LM head is not supported: fastkto reads the head's weight "
                "directly, so the adapter would be ignored. Remove 'lm_head' from target_modules / modules_to_save."
            )
    except ImportError:
        pass
    weight = getattr(head, "weight", None)
    # a ZeRO-3 partitioned weight is an empty tensor on its own; its shape is in ds_shape
    shape = getattr(weight, "ds_shape", None) if is_partitioned(weight) else getattr(weight, "shape", None)
    if not isinstance(weight, torch.Tensor) or shape is None or len(shape) != 2:
        raise ValueError(f"the LM head {type(head).__name__} has no (vocab, hidden) weight matrix")
    return head


def logit_transform(config, temperature: float = 1.0) -> tuple[float | None, float]:
    """(softcap, temperature) for fastkto that reproduce the logit transform ``config`` declares (see the table in
    the module docstring), with an extra sampling ``temperature`` dividing the result."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    for name, multiplies in _SCALES:
        value = getattr(text, name, None)
        if value is not None:
            scale = float(value) if multiplies else 1.0 / float(value)
            break
    else:
        value = getattr(text, "logits_scaling", None)
        if value is not None:
            multiplies = getattr(text, "model_type", None) in _MULTIPLYING_LOGITS_SCALING
            scale = float(value) if multiplies else 1.0 / float(value)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the model's logit scale must be finite and > 0 to map to a temperature, got {scale}")
    cap = getattr(text, "final_logit_softcapping", None)
    softcap = None if cap is None else float(cap) / scale
    return softcap, float(temperature) / scale


# ------------------------------------------------------------------------------------------------------- the head
@dataclass(frozen=True)
class LMHead:
    """A causal LM's output layer as fastkto sees it: logits = transform(hidden @ weight.T + bias).

    Attributes:
        weight: (V, D) parameter of the model (shared with the input embeddings when tied): gradients reach it.
        bias: (V,) or None.
        softcap, temperature: fastkto's logit transform (``fused_logprobs``), already mapped from the model's.
        module: the model's head module (set by ``get_lm_head``); needed only when DeepSpeed ZeRO-3 partitions the
            weight, whose log-probabilities then run inside that module's hooks.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    temperature: float = 1.0
    module: torch.nn.Module | None = field(default=None, compare=False, repr=False)

    def kwargs(self) -> dict:
        """The keyword arguments of ``fastkto.fused_logprobs`` / ``sequence_logps`` / the loss modules."""
        return {"bias": self.bias, "softcap": self.softcap, "temperature": self.temperature}

    def _prepare(self, hidden: torch.Tensor) -> torch.Tensor:
        # autocast or a norm computed in fp32 can hand back hidden states in another dtype than the head; the head
        # is what the model would multiply with, so follow its dtype (fastkto accumulates in fp32 either way)
        return hidden if hidden.dtype == self.weight.dtype else hidden.to(self.weight.dtype)

    def logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """Per-token log-probabilities, labels' shape, float32 (``fastkto.fused_logprobs`` with this head).

        ``hidden`` (..., D), ``labels`` (...) int with -100 on unscored positions; extra kwargs (backend,
        workspace_bytes, ...) go to ``fused_logprobs``.
        """
        hidden = self._prepare(hidden)
        if is_partitioned(self.weight) or is_partitioned(self.bias):
            if self.module is None:
                raise ValueError(
                    "the LM head's weight is DeepSpeed ZeRO-3 partitioned and this LMHead has no module to gather it "
                    "with: build it with get_lm_head(model)"
                )
            # the module's hooks gather (and for the backward, gather again) its own weight and bias: read them
            # inside the call, where they hold the full values
            head = self.module
            return as_module_forward(head, lambda h: fused_logprobs(
                h, head.weight, labels, bias=None if self.bias is None else head.bias, softcap=self.softcap,
                temperature=self.temperature, **kwargs), hidden)
        return fused_logprobs(hidden, self.weight, labels, **self.kwargs(), **kwargs)

    def sequence_logps(self, hidden: torch.Tensor, labels: torch.Tensor, *, average: bool = False,
                       cu_seqlens: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Per-sequence sums (``average=True``: means) over valid tokens, float32: shape labels.shape[:-1], or (S,)
        for a packed batch with ``cu_seqlens`` (see ``fastkto.sequence_logps``)."""
        if is_partitioned(self.weight) or is_partitioned(self.bias):
            lengths = None if cu_seqlens is None else _packed_lengths(hidden, labels, cu_seqlens)
            per_token = self.logprobs(hidden, labels, **kwargs)
            ignore_index = kwargs.get("ignore_index", -100)
            if lengths is None:
                total, count = per_token.sum(-1), (labels != ignore_index).sum(-1)
            else:
                total = packing.segment_sums(per_token.reshape(-1), lengths)
                count = packing.segment_counts(labels.reshape(-1) != ignore_index, lengths)
            return total / count.clamp(min=1) if average else total
        return sequence_logps(self._prepare(hidden), self.weight, labels, average=average, cu_seqlens=cu_seqlens,
                              **self.kwargs(), **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The materialized, transformed logits (..., V) in float32: for small metric chunks and naive baselines.
        A ZeRO-3 partitioned head is gathered for the call; a DTensor (FSDP2-sharded) one is all-gathered, its
        gradient reduce-scattered as ``fused_logprobs`` does (``fastkto.distributed.gather_sharded``)."""
        with gathered_parameters(self.weight, self.bias):
            weight, bias = gather_sharded(self.weight, self.bias)
            return reference.logits(hidden, weight, bias, softcap=self.softcap, temperature=self.temperature,
                                    dtype=torch.float32)


def get_lm_head(model: torch.nn.Module, *, temperature: float = 1.0) -> LMHead:
    """The ``LMHead`` of a transformers causal LM (or a PEFT / DDP / compiled wrapper of one).

    ``temperature`` is an extra sampling temperature dividing the model's logits (1.0: the model's own logits).
    Raises ValueError for a model without an LM head, or with an adapter on it.
    """
    inner = unwrap_model(model)
    _check_tie(inner)
    head = _head_module(inner)
    softcap, temp = logit_transform(inner.config, temperature)
    bias = getattr(head, "bias", None)
    return LMHead(weight=head.weight, bias=bias if isinstance(bias, torch.Tensor) else None, softcap=softcap,
                  temperature=temp, module=head)


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                  *, position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                  **kwargs) -> torch.Tensor:
    """The backbone's last hidden states (B, T, D) in the model's dtype, without the LM head's work.

    ``model`` is what you train: a transformers causal LM, or a wrapper of one (PEFT, ``DistributedDataParallel``,
    FSDP1, an FSDP2 root, ``torch.compile(model)``, a model after ``model.compile()``, a DeepSpeed engine). The
    model you pass is called, so every wrapper does its work: DDP prepares its gradient sync, FSDP unshards and
    reshards, Dynamo compiles. The call asks for the logits of no position (``logits_to_keep`` an empty index
    tensor, so the head multiplies zero rows) and the hidden states are taken from the backbone's output (a forward
    hook on ``model.base_model``: exactly what the backbone returns, after its final norm).

    Extra kwargs (inputs_embeds, ...) go to the model; the KV cache is off. Row t predicts token t + 1, so pair it
    with labels shifted as ``fastkto.data``'s collators shift them.

    Packed batches (``fastkto.packing``; the collators' ``packed=True``): input_ids (1, T_total) holding several
    sequences, marked by ``cu_seqlens`` (S + 1,) or by ``position_ids`` (1, T_total) restarting at 0 for each
    sequence (either one; given both, they must agree), and no attention_mask (an all-ones one is dropped). The
    backbone then gets those position ids and no mask, which is how transformers recognizes packed sequences:
    eager / SDPA / flex attention get a block-diagonal causal mask, flash-attention its varlen kernel (given the
    cu_seqlens as ``cu_seq_lens_q`` / ``cu_seq_lens_k``). Each row's hidden states equal those of a padded batch
    of the same rows. A model that builds its attention mask without the position ids (OPT, Falcon, Bloom and
    gpt-oss in transformers 5.x, or custom code) would let the rows attend to each other: that raises
    NotImplementedError after the call, instead of returning mixed rows.
    """
    kwargs.setdefault("use_cache", False)
    out = backbone_outputs(model, input_ids, attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
                           **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def backbone_outputs(model: torch.nn.Module, input_ids: torch.Tensor | None,
                     attention_mask: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None, **kwargs):
    """The backbone's whole output (hidden states, router logits, ...), run as ``hidden_states`` runs it:
    packed batches get their position ids and no mask, and a model that would let packed rows attend to each other
    raises NotImplementedError.

    ``model``: a causal LM or any wrapper of one (see ``hidden_states``: the model passed is called, with the LM
    head on zero positions, and the backbone's output is captured), or a backbone itself (a module without an LM
    head, e.g. ``LlamaModel``), which is called as is. kwargs go to the call unchanged.
    """
    inner = unwrap_model(model)
    backbone = getattr(inner, "base_model", None)
    if backbone is None:
        raise ValueError(
            f"{type(inner).__name__} is neither a transformers causal LM nor a backbone (it has no base_model): "
            "pass e.g. an AutoModelForCausalLM model or its wrapper"
        )
    wrappers = _wrappers(model)
    if backbone is inner:  # a backbone itself: its own call (through whatever wraps it) is the one to make
        run = model
    else:
        _check_tie(inner)
        # with nothing around the model whose call matters (PEFT adapters sit in the backbone's layers), the
        # backbone alone is the same computation without the head; otherwise the wrapper is called
        run = functools.partial(_run_capturing, model, inner, backbone, wrappers) if wrappers else backbone
    config = inner.config
    _check_token_inputs(input_ids, attention_mask)
    packed = packed_layout(input_ids, attention_mask, position_ids, cu_seqlens, kwargs)
    if packed is None:
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return run(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    impl = str(getattr(config, "_attn_implementation", None))
    return run_packed(run, type(backbone).__name__, impl, input_ids, packed, kwargs)


def _check_token_inputs(input_ids, attention_mask) -> None:
    """input_ids (B, T) integer and a 2-d attention_mask of its shape, checked before the model sees them: the
    model would fail inside its embedding or attention, or (a shorter all-ones mask) drop the mask silently."""
    if input_ids is None:
        return  # inputs_embeds: the model checks them
    check_integer_tensor("input_ids", input_ids, "token ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)} (one row: input_ids[None])")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty: got shape {tuple(input_ids.shape)}")
    # a 4-d mask is a custom (B, 1, T, T) attention mask, which transformers takes as it is
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() <= 2 \
            and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")


class _Capture:
    """Where the backbone's forward hook puts its output while ``_run_capturing`` calls the model. A plain object
    (not thread-local) so that Dynamo traces the hook's store as an ordinary side effect of the compiled graph."""

    __slots__ = ("active", "outputs")

    def __init__(self):
        self.active = False
        self.outputs = []


def _capture_hook(module, args, output):
    # looked up on the module (not closed over), so a deep copy of the model captures into its own slot
    capture = getattr(module, "_fastkto_capture", None)
    if capture is not None and capture.active:
        capture.outputs.append(output)


def _capture_of(backbone: torch.nn.Module) -> _Capture:
    """The backbone's capture slot, with its forward hook installed on first use. The hook stays (a no-op while
    ``active`` is False): Dynamo does not guard on module hooks, so one added after a compiled model first ran would
    not be seen by that graph; the capture runs with its own ``logits_to_keep`` argument, whose guard traces a
    new graph that contains the hook."""
    capture = backbone.__dict__.get("_fastkto_capture")
    if capture is None:
        import torch._dynamo  # loaded with any transformers model already; not at fastkto's import (2 s)

        capture = torch._dynamo.disable(_install_capture)(backbone)
    return capture


def _install_capture(backbone: torch.nn.Module) -> _Capture:
    """Installs the capture slot and hook once, outside Dynamo. Traced (first use inside a compiled caller), the
    lookup above is not guarded, so that frame takes this branch on every call: each call then added one more hook
    (every backbone output recorded once per hook: "called the backbone more than once") and a new slot. Run
    eagerly, the check below sees the slot the first call installed."""
    capture = backbone.__dict__.get("_fastkto_capture")
    if capture is None:
        capture = _Capture()
        backbone.register_forward_hook(_capture_hook)
        backbone.__dict__["_fastkto_capture"] = capture
    return capture


@functools.cache
def _takes_logits_to_keep(cls) -> bool:  # cls: a model class (hashable, so cached per class)
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _run_capturing(model: torch.nn.Module, inner: torch.nn.Module, backbone: torch.nn.Module, wrappers: list[str],
                   **kwargs):
    """Call ``model`` (the outermost wrapper) with the LM head on zero positions; the backbone's output."""
    around = ", ".join(wrappers)
    if not _takes_logits_to_keep(type(inner)):  # type: ignore[arg-type]  # a class hashes; torch is Any to mypy
        raise ValueError(
            f"{type(inner).__name__}.forward takes no logits_to_keep, so running it through {around} (which fastkto "
            "must call, not bypass) would build the full (B, T, V) logits: run this model without that wrapper"
        )
    kwargs.pop("logits_to_keep", None)
    device = next((t.device for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
                   if isinstance(t, torch.Tensor)), None)
    capture = _capture_of(backbone)
    if capture.active:
        raise RuntimeError("hidden_states / backbone_outputs re-entered on the same backbone (a forward hook that "
                           "calls them?): not supported")
    capture.active, capture.outputs = True, []
    try:
        root_output = model(**kwargs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
        outputs = capture.outputs
    finally:
        capture.active, capture.outputs = False, []
    if _is_fsdp2(inner) and _root_resharded(inner):
        raise ValueError(
            f"fully_shard({type(inner).__name__}, reshard_after_forward=True) at the root: hidden_states calls the "
            "root but its backward starts from the backbone's output, not the root's, so FSDP2 would not unshard "
            "the root's parameters (the embeddings) for backward. Leave the root's reshard_after_forward unset (the "
            "root then keeps its parameters until backward) or False"
        )
    if len(outputs) != 1:
        why = ("its forward does not call the backbone module (it calls a submodule of it directly)" if not outputs
               else "its forward called the backbone more than once")
        raise RuntimeError(
            f"{type(inner).__name__} under {around}: {why}, so fastkto cannot take {type(backbone).__name__}'s "
            "output from the wrapper's call. Run the model without the wrapper, or (a compiled model traced before "
            "fastkto's hook existed) call torch._dynamo.reset() first"
        )
    out = outputs[0]
    logits = getattr(root_output, "logits", None)
    if ((_is_fsdp1(model) or _is_ddp(model)) and isinstance(logits, torch.Tensor) and logits.requires_grad
            and isinstance(getattr(out, "last_hidden_state", None), torch.Tensor)):
        out.last_hidden_state = _AfterRootOutput.apply(out.last_hidden_state, logits)
    return out


def verify_lm_head(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **kwargs) -> float:
    """Max |fastkto log-prob - log_softmax(model(input_ids).logits)| over the next-token labels of ``input_ids``.

    Use it on a small input to check an architecture whose logit transform is not in this module's table; a value
    near float rounding (about 1e-5 in float32) means the head was found correctly. Runs under no_grad.
    """
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
        labels = input_ids[:, 1:]
        expected = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        hidden = hidden_states(model, input_ids, attention_mask, **kwargs)[:, :-1]
        got = get_lm_head(model).logprobs(hidden, labels)
        if attention_mask is not None:
            keep = attention_mask[:, 1:].bool()
            expected, got = expected[keep], got[keep]
        return float((got.double() - expected).abs().max()) if got.numel() else 0.0


# the private names fastkto.integrations.trl imported before these became public seams
_unwrap, _backbone_module = unwrap_model, backbone_module
