"""The primitive: per-token log-probabilities of labels under softmax(hidden @ weight.T), without the logits.

This module is the contract. It checks the arguments, keeps only the tokens whose label is not ``ignore_index``
(prompt and padding tokens cost nothing), picks an implementation (``kernels.fused_logprob`` with Triton, or
``kernels.torch_chunked`` elsewhere: same arguments, same outputs), merges vocabulary shards for tensor-parallel
LM heads, and wraps it all in one ``torch.autograd.Function`` whose backward recomputes what it needs. Nothing of
size tokens x vocabulary is built or saved, forward or backward.
"""

from __future__ import annotations

import importlib.util
import math
from types import ModuleType

import torch

from . import distributed as _dist
from . import packing
from .kernels import torch_chunked

__all__ = ["fused_logprobs", "sequence_logps", "BACKENDS", "triton_available", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """True when Triton can be imported (it is optional: the PyTorch path needs none)."""
    return importlib.util.find_spec("triton") is not None


def _triton_impl() -> ModuleType:
    from .kernels import fused_logprob

    return fused_logprob


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation ``backend`` means for tensors on ``device``: "triton" or "torch"."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    has_triton = triton_available()
    if backend == "auto":
        if device.type != "cuda" or not has_triton:
            return "torch"
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            return "torch"  # bf16 tensor-core dots need sm_80 or newer
        return "triton"
    if not has_triton:
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    if device.type != "cuda" and not _triton_impl().INTERPRET:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on the CPU it runs only under Triton's "
            "interpreter (TRITON_INTERPRET=1 set before triton is imported). Use backend='torch' or 'auto'."
        )
    return "triton"


def _check_number(name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number{' or None' if optional else ''}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden and weight must share a dtype, got hidden {hidden.dtype} and weight {weight.dtype}: run the call "
            f"under torch.autocast (as the model's own head runs in mixed precision), or cast one of them, e.g. "
            f"hidden.to({weight.dtype})"
        )
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        logits = (" (its last dimension equals the vocabulary size V: these look like logits; pass the final hidden "
                  "states, the backbone's output before the LM head)") if hidden.shape[-1] == weight.shape[0] else ""
        raise ValueError(
            f"hidden size mismatch: hidden has D={hidden.shape[-1]} but weight has shape {tuple(weight.shape)} "
            f"(V, D){logits}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    devices = {t.device for t in (hidden, weight, labels) + (() if bias is None else (bias,))}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}")
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            "hidden, weight, labels and bias must hold data, but some are on the meta device (a model built under "
            "init_empty_weights / device_map='meta' and never materialized): load or move them to cpu / cuda first"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_number("temperature", temperature)
    _check_number("softcap", softcap, optional=True)


def _autocast(hidden, weight, bias):
    """Under ``torch.autocast`` the head runs in the autocast dtype, as an ``nn.Linear`` would there; the casts are
    ordinary autograd ops, so fp32 master weights get fp32 gradients."""
    # meta tensors have no autocast state to ask about; _check_inputs names them
    if (not isinstance(hidden, torch.Tensor) or hidden.device.type == "meta"
            or not torch.is_autocast_enabled(hidden.device.type)):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES and t.dtype != dtype else t

    return cast(hidden), cast(weight), cast(bias)


class _FusedLogprob(torch.autograd.Function):
    """(N, D) hidden, (V, D) weight -> (N,) float32 log-probabilities of the scored rows, 0 elsewhere."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, labels, impl, opts, group, vocab_offset, regather):
        # the implementations choose their own precisions; autocast must not recast their products
        with torch.autocast(hidden.device.type, enabled=False):
            return _FusedLogprob._forward(
                ctx, hidden, weight, bias, rows, labels, impl, opts, group, vocab_offset, regather
            )

    @staticmethod
    def _forward(ctx, hidden, weight, bias, rows, labels, impl, opts, group, vocab_offset, regather):
        n_rows = hidden.shape[0]
        out = torch.zeros(n_rows, device=hidden.device, dtype=torch.float32)
        local = labels - vocab_offset if vocab_offset else labels
        if labels.numel():
            row_max, sum_exp, target = impl.logprob_fwd(hidden, weight, bias, rows, local, **opts)
            if group is not None:
                row_max, sum_exp, target = _dist.combine_vocab_parallel(row_max, sum_exp, target, group)
            lse = row_max + torch.log(sum_exp)
            logp = target - lse
            if rows is None:
                out = logp
            else:
                out.index_copy_(0, rows, logp)
        else:
            lse = out[:0]
        if regather is not None:  # a gathered DTensor weight / bias is not kept: backward gathers it again
            weight = None if regather.sharded[0] else weight
            bias = None if regather.sharded[1] else bias
        ctx.save_for_backward(hidden, weight, bias, rows, local, lse)
        ctx.impl, ctx.opts, ctx.group, ctx.regather = impl, opts, group, regather
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _FusedLogprob._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, bias, rows, local, lse = ctx.saved_tensors
        if ctx.regather is not None:
            full_w, full_b = ctx.regather()
            weight = weight if full_w is None else full_w
            bias = bias if full_b is None else full_b
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad_out.float()
        grad = grad if rows is None else grad.index_select(0, rows)
        d_hidden, d_weight, d_bias = ctx.impl.logprob_bwd(
            hidden, weight, bias, rows, local, lse, grad,
            need_hidden=need_h, need_weight=need_w, need_bias=need_b, **ctx.opts,
        )
        if d_hidden is not None:
            if ctx.group is not None:  # every shard's vocabulary contributes to each hidden state's gradient
                _dist.all_reduce_sum(d_hidden, ctx.group)
            if rows is None:
                d_hidden = d_hidden.to(hidden.dtype)
            else:
                d_hidden = _scatter_rows(torch.zeros_like(hidden), rows, d_hidden, ctx.opts["workspace_bytes"])
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None


def _scatter_rows(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, workspace_bytes: int | None):
    """out[rows] = src (fp32, compact) in out's dtype; a 16-bit cast goes through the workspace a chunk at a
    time, so that no (M, D) temporary sits beside the fp32 gradient."""
    if src.dtype == out.dtype:
        return out.index_copy_(0, rows, src)
    budget = torch_chunked.default_workspace_bytes(out.device) if workspace_bytes is None else workspace_bytes
    step = max(1, budget // (src.shape[1] * out.element_size()))
    for r0 in range(0, rows.numel(), step):
        out.index_copy_(0, rows[r0:r0 + step], src[r0:r0 + step].to(out.dtype))
    return out


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    process_group=None,
    workspace_bytes: int | None = None,
) -> torch.Tensor:
    """log_softmax(z)[label] for every position, with z = hidden @ weight.T + bias never materialized.

    Args:
        hidden: (..., D) float32, bfloat16 or float16: final hidden states.
        weight: (V, D), hidden's dtype: the LM-head weight. With ``process_group``: this rank's contiguous slice
            of the vocabulary rows (slices in rank order; sizes may differ). A DTensor (FSDP2) weight is gathered
            once for the forward, freed when the call returns, and gathered again in backward.
        labels: hidden's leading shape (...), integer: ``labels[..., t]`` is the token scored from
            ``hidden[..., t]`` (no shift inside). Values in [0, V_total) or ``ignore_index``.
        bias: (V,) in weight's dtype, or None (this rank's slice with ``process_group``).
        ignore_index: label value whose positions return exactly 0, get exactly zero gradient and cost no work.
        temperature: logits are divided by it after the soft-cap (> 0).
        softcap: if set, z = softcap * tanh(z / softcap) before the temperature (Gemma-2 uses 30).
        backend: "auto" (Triton for CUDA tensors when importable, else PyTorch), "triton" or "torch".
        process_group: a torch.distributed group whose ranks hold the vocabulary slices (vocab-parallel head);
            all ranks pass the same hidden and labels.
        workspace_bytes: budget for temporaries (PyTorch path: tiles; Triton: split buffers); default
            ``$FASTKTO_WORKSPACE_MIB`` MiB or 64 MiB.

    Returns:
        float32 tensor of labels' shape. Differentiable w.r.t. hidden, weight and bias for any upstream gradient;
        gradients come back in the inputs' dtypes, accumulated in float32. Under ``torch.autocast`` hidden, weight
        and bias are first cast to the autocast dtype (as ``nn.Linear`` does there).
    """
    hidden, weight, bias = _autocast(hidden, weight, bias)

    def checked_locally():
        _check_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap)
        budget = None
        if workspace_bytes is not None:
            _check_number("workspace_bytes", workspace_bytes)
            budget = int(workspace_bytes)
        w, b, regather = _dist.gather_for_call(weight, bias, process_group=process_group)
        impl_name = resolve_backend(backend, hidden.device, hidden.dtype)
        return w, b, regather, (_triton_impl() if impl_name == "triton" else torch_chunked), budget

    if process_group is None:
        weight, bias, regather, impl, workspace_bytes = checked_locally()
        vocab_offset, vocab_total = 0, weight.shape[0]
    else:
        # a rank that rejects its own input still joins the layout all-gather, so that no rank is left waiting
        try:
            weight, bias, regather, impl, workspace_bytes = checked_locally()
            error = None
        except (TypeError, ValueError, RuntimeError) as err:
            error = err
        sizes = (0, 0, 0) if error else (weight.shape[0], hidden.shape[-1], labels.numel())
        labels_hash = None if error else _dist.labels_fingerprint(labels)
        layout = _dist.vocab_shard_layout(*sizes, process_group, ok=error is None, labels_hash=labels_hash)
        if error is not None:
            raise error
        vocab_offset, vocab_total = layout

    dim = hidden.shape[-1]
    hidden2d = hidden.reshape(-1, dim)
    flat = labels.reshape(-1).long()

    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab_total))
    any_bad, all_valid = torch.stack([bad.any(), valid.all()]).tolist()  # one host sync for both checks
    if any_bad:
        first = flat[bad][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab_total}) or equal ignore_index={ignore_index}; found {first}"
        )
    if all_valid:
        rows, kept = None, flat
    else:
        rows = valid.nonzero().squeeze(1)
        kept = flat.index_select(0, rows)
    opts = {"softcap": softcap, "temperature": float(temperature), "workspace_bytes": workspace_bytes}
    out = _FusedLogprob.apply(hidden2d, weight, bias, rows, kept, impl, opts, process_group, vocab_offset, regather)
    return out.reshape(labels.shape)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    average: bool = False,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    process_group=None,
    workspace_bytes: int | None = None,
) -> torch.Tensor:
    """Per-sequence log-probability: the sum (``average=True``: the mean) of ``fused_logprobs`` over the valid
    tokens of each sequence.

    Args: as ``fused_logprobs``, and
        hidden, labels: padded, (..., T, D) and (..., T): one sequence per row of the last dimension; or packed
            (``cu_seqlens`` given): (T_total, D) or (1, T_total, D) and labels (T_total,) or (1, T_total), the
            sequences concatenated (``fastkto.packing``; the collators' ``packed=True`` batches).
        cu_seqlens: None (padded), or the packed layout: (S + 1,) int32 / int64 on labels' device, 0, then the
            running total of the S sequence lengths, ending at T_total (flash-attention's convention; convert
            transformers' restarting ``position_ids`` with ``fastkto.packing.cu_seqlens_from_position_ids``).

    Returns:
        float32 tensor of shape labels.shape[:-1] (padded) or (S,) (packed). A sequence without a valid token gives
        0 (never NaN). Packed and padded layouts of the same rows give the same values: the per-token log-probs
        are computed row by row either way, and the packed sums reduce a zero-padded (S, longest) matrix, as
        the padded batch's (padded to its longest row) are reduced; without atomic adds, so deterministic on CUDA.
    """
    if isinstance(labels, torch.Tensor) and labels.dim() < 1:
        raise ValueError("labels must have a sequence dimension: shape (..., T), got a 0-d tensor")
    if not isinstance(average, bool):
        raise TypeError(f"average must be a bool, got {type(average).__name__}")
    lengths = None
    if cu_seqlens is not None and process_group is None:
        lengths = _packed_lengths(hidden, labels, cu_seqlens)
    per_token = fused_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        backend=backend, process_group=process_group, workspace_bytes=workspace_bytes,
    )
    if cu_seqlens is not None and lengths is None:
        # with a process group the layout is checked after the collective call, so that a rank that rejects it
        # has still joined the other ranks there
        lengths = _packed_lengths(hidden, labels, cu_seqlens)
    if lengths is not None:
        total = packing.segment_sums(per_token.reshape(-1), lengths)
        if not average:
            return total
        return total / packing.segment_counts(labels.reshape(-1) != ignore_index, lengths).clamp(min=1)
    total = per_token.sum(dim=-1)
    if not average:
        return total
    count = (labels != ignore_index).sum(dim=-1).clamp(min=1)
    return total / count


def _packed_lengths(hidden, labels, cu_seqlens) -> torch.Tensor:
    """The (S,) lengths of a packed call's sequences, after checking its shapes against ``cu_seqlens``."""
    for name, t in (("hidden", hidden), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (labels.dim() == 1 or (labels.dim() == 2 and labels.shape[0] == 1)):
        raise ValueError(f"packed labels (cu_seqlens given) must have shape (T_total,) or (1, T_total), got "
                         f"{tuple(labels.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"packed hidden must have shape labels.shape + (D,) = {tuple(labels.shape)} + (D,) (the "
                         f"tokens of every sequence, concatenated), got {tuple(hidden.shape)}")
    return packing.check_cu_seqlens(cu_seqlens, labels.shape[-1], device=labels.device)
