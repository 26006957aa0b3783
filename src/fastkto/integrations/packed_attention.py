"""Packed batches through a ``transformers`` backbone: the layout of a packed call, the check that its rows stay
apart, and a varlen SDPA attention that runs each packed sequence on its own.

A packed batch (``fastkto.packing``) is one row (1, T_total) holding several sequences, marked by ``cu_seqlens`` or
by position ids restarting at 0. transformers keeps the sequences apart when the backbone gets those position ids and
no attention mask (a block-diagonal causal mask for eager / SDPA / flex attention, the varlen kernel for
flash-attention). ``packed_layout`` recognizes and checks such a call, ``run_packed`` makes it and refuses a model
whose mask ignored the position ids (``PackedMaskRecorder`` watches transformers' mask building), and
``use_varlen_sdpa`` swaps SDPA's dense (T_total x T_total) mask for one SDPA call per sequence.

Model quirks of packed attention live here: which implementations read the cu_seqlens kwargs (``run_packed``), and
which calls the varlen SDPA hands back to transformers' SDPA (``_varlen_sdpa_attention``).
"""

from __future__ import annotations

import functools
import threading

import torch

from .. import packing

__all__ = ["VARLEN_SDPA", "use_varlen_sdpa", "packed_layout", "run_packed", "PackedMaskRecorder"]

VARLEN_SDPA = "fastkto_varlen_sdpa"


def use_varlen_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a model that uses SDPA attention to fastkto's varlen SDPA, for packed batches; returns the model.

    transformers runs a packed batch under eager / SDPA attention with a dense (T_total x T_total) block-diagonal
    mask: correct, but every row attends over the whole packed length and most of the products are masked away,
    so a packed batch of 8 rows costs several times the attention of the padded one. The varlen SDPA runs
    ``scaled_dot_product_attention(is_causal=True)`` on each packed sequence separately (what flash-attention's
    varlen kernel does in one launch), for the calls ``hidden_states`` / ``backbone_outputs`` make on packed
    batches. Every other call (padded batches, generation with a cache, a sliding window shorter than a row)
    goes to transformers' SDPA with its usual mask, unchanged. The setting persists (``model.config
    ._attn_implementation``), so gradient-checkpointing recomputation runs the same attention.

    Raises ValueError for a model whose attention is not SDPA (eager-only models such as Gemma-2 with attention
    soft-capping keep the dense mask; flash-attention has its own varlen path).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from .transformers import unwrap_model  # the model lookup imports this module: resolved at call time

    inner = unwrap_model(model)
    current = getattr(inner.config, "_attn_implementation", None)
    if current == VARLEN_SDPA:
        return model
    if current != "sdpa":
        raise ValueError(f"use_varlen_sdpa needs a model running SDPA attention; {type(inner).__name__} runs "
                         f"{current!r} (packed batches still work there, with a dense block-diagonal mask)")
    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)  # the masks of the calls it hands to SDPA
    inner.set_attn_implementation(VARLEN_SDPA)
    return model


def _varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers attention function: per-sequence causal SDPA for packed calls (``cu_seq_lens_q`` given by
    ``backbone_outputs``), transformers' SDPA otherwise. query (1, H, T, d), key / value (1, H_kv, T, d); returns
    (1, T, H, d) and no weights, as transformers' SDPA does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    varlen = (cu is not None and query.shape[0] == 1 and key.shape[2] == query.shape[2] == int(cu[-1]) and causal
              and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)
              and kwargs.get("position_bias") is None
              and (window is None or int(kwargs.get("max_length_q") or query.shape[2]) <= int(window)))
    if not varlen:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    bounds = cu.tolist()
    out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
            is_causal=True, scale=scaling, enable_gqa=gqa)
        for a, b in zip(bounds[:-1], bounds[1:]) if b > a
    ], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _positions_restart(position_ids, attention_mask) -> bool:
    """Whether ``position_ids`` restart at 0 after a row's first real token: a second sequence packed in the row.

    Only the tokens the mask keeps count, so that a padded batch with explicit positions (left padding gives its
    pad tokens any position, often 0 or 1) is not mistaken for a packed one, while a packed batch that also
    carries a mask with zeros is still recognized as packed (and then refused: a packed row has no padding)."""
    if attention_mask is None:
        return bool((position_ids[..., 1:] == 0).any())  # a 0 after the first token: a second sequence starts
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.numel() != position_ids.numel() \
            or attention_mask.dim() < 1:
        # a mask of another layout (4-D, say) cannot be matched to the positions: decide on the positions alone,
        # unless the mask has zeros (then a padded batch, as before)
        if isinstance(attention_mask, torch.Tensor) and not bool((attention_mask != 0).all()):
            return False
        return bool((position_ids[..., 1:] == 0).any())
    real = attention_mask.reshape(-1, attention_mask.shape[-1]).to(position_ids.device) != 0
    positions = position_ids.reshape(real.shape)
    later = real & (real.long().cumsum(-1) > 1)  # the real tokens after each row's first one
    return bool(((positions == 0) & later).any())


def packed_layout(input_ids, attention_mask, position_ids, cu_seqlens, kwargs):
    """(position_ids (1, T_total), cu_seqlens, number of sequences) of a packed call, or None for a padded one."""
    if cu_seqlens is None:
        if position_ids is None or not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] < 2:
            return None
        if not _positions_restart(position_ids, attention_mask):
            return None
    tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[0] != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"a packed batch (cu_seqlens, or position_ids restarting at 0) must have input_ids of shape "
                         f"(1, T_total) (or inputs_embeds (1, T_total, D)), got {shape}")
    total = tokens.shape[1]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (1, total) \
                or not bool((attention_mask != 0).all()):
            raise ValueError(
                "a packed batch takes no attention_mask (or an all-ones (1, T_total) one): transformers recognizes "
                "packed sequences from position_ids only when the mask is None, and a packed batch has no padding"
            )
    if cu_seqlens is not None:
        packing.check_cu_seqlens(cu_seqlens, total, device=tokens.device, tokens_name="input_ids")
        from_cu = packing.position_ids_from_cu_seqlens(cu_seqlens)[None]
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape[-1:]) != (total,) \
                    or not torch.equal(position_ids.reshape(1, -1).to(from_cu), from_cu):
                raise ValueError("position_ids and cu_seqlens disagree: position_ids must restart at 0 exactly where "
                                 "each sequence of cu_seqlens starts (or pass only one of them)")
        position_ids = from_cu
    else:
        if tuple(position_ids.shape[-1:]) != (total,) or position_ids.numel() != total:
            raise ValueError(f"position_ids must have shape (1, {total}) like input_ids, got "
                             f"{tuple(position_ids.shape)}")
        cu_seqlens = packing.cu_seqlens_from_position_ids(position_ids)
        position_ids = position_ids.reshape(1, -1)
    return position_ids, cu_seqlens, cu_seqlens.shape[0] - 1


class PackedMaskRecorder:
    """Records, for the calls made in its block on this thread, whether each attention mask transformers built saw
    packed sequences (``masking_utils._preprocess_mask_arguments`` found a packed_sequence_mask in position_ids).

    The recording wrapper is installed once and passes calls straight through outside such a block; a
    transformers without that function records nothing, which ``run_packed`` reports as unverifiable.
    """

    _local = threading.local()
    _installed = False
    _lock = threading.Lock()

    def __init__(self):
        self.calls: list[bool] = []

    @classmethod
    def _install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            try:
                from transformers import masking_utils
            except ImportError:
                return
            original = getattr(masking_utils, "_preprocess_mask_arguments", None)
            if original is None:
                return

            @functools.wraps(original)
            def recording(*args, **kwargs):
                result = original(*args, **kwargs)
                calls = getattr(cls._local, "calls", None)
                if calls is not None:
                    # (early_exit, attention_mask, packed_sequence_mask, ...): packed when the mask was derived
                    calls.append(not result[0] and result[2] is not None)
                return result

            masking_utils._preprocess_mask_arguments = recording
            cls._installed = True

    def __enter__(self):
        self._install()
        self._outer = getattr(self._local, "calls", None)
        self._local.calls = self.calls
        return self

    def __exit__(self, *exc):
        self._local.calls = self._outer
        return False


def run_packed(run, backbone_name: str, impl: str, input_ids, packed, kwargs):
    """Call ``run`` (the backbone, or the model that captures the backbone's output) on a packed batch.

    ``packed`` is ``packed_layout``'s (position_ids, cu_seqlens, number of sequences). The call gets those position
    ids and no attention mask, which is how transformers recognizes packed sequences, plus the cu_seqlens kwargs
    of ``DataCollatorWithFlattening`` when the attention implementation ``impl`` reads them (flash-attention's
    varlen kernel, fastkto's varlen SDPA). A model that built its attention mask without the packed position ids
    would let the rows attend to each other: that raises NotImplementedError after the call, naming
    ``backbone_name``, instead of returning mixed rows.
    """
    position_ids, cu_seqlens, n_seqs = packed
    if impl.startswith("flash_attention") or impl.startswith("paged|flash") or impl == VARLEN_SDPA:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu32 = cu_seqlens.to(torch.int32)
        kwargs.update(cu_seq_lens_q=cu32, cu_seq_lens_k=cu32, max_length_q=longest, max_length_k=longest)
    with PackedMaskRecorder() as masks:
        out = run(input_ids=input_ids, attention_mask=None, position_ids=position_ids, **kwargs)
    if n_seqs > 1 and (not masks.calls or not all(masks.calls)):
        what = ("built no attention mask through transformers.masking_utils" if not masks.calls else
                "built an attention mask without the packed position_ids")
        raise NotImplementedError(
            f"{backbone_name} ({impl} attention) {what}, so the {n_seqs} packed sequences would "
            "attend to each other: run this model on padded batches (the collators' packed=False)"
        )
    return out
