"""The primitive: per-token log-probabilities of labels under softmax(hidden @ weight.T), without the logits.

This module is the contract. It checks the arguments, keeps only the tokens whose label is not ``ignore_index``
(prompt and padding tokens cost nothing), picks an implementation from ``fastkto.kernels.IMPLEMENTATIONS`` (the
Triton kernels of ``kernels.fused_logprob``, or ``kernels.torch_chunked`` elsewhere: same arguments, same
outputs), merges vocabulary shards for tensor-parallel LM heads, and wraps it all in one
``torch.autograd.Function`` whose backward recomputes what it needs. Nothing of size tokens x vocabulary is built
or saved, forward or backward.
"""

from __future__ import annotations

import functools
import math

import torch

from . import distributed as _dist
from . import kernels as _kernels
from . import ops, packing
from ._checks import check_int
from .value_checks import ValueChecks

__all__ = ["fused_logprobs", "token_stats", "TOKEN_FIELDS", "sequence_logps", "BACKENDS", "triton_available",
           "resolve_backend"]

# "auto" and the names of ``fastkto.kernels.IMPLEMENTATIONS`` (Triton, then chunked PyTorch)
BACKENDS = ("auto", *_kernels.IMPLEMENTATIONS)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """True when Triton can be imported (it is optional: the PyTorch path needs none)."""
    return _kernels.available("triton")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation ``backend`` means for tensors on ``device``: a name of ``fastkto.kernels.IMPLEMENTATIONS``
    ("triton", "cublas" or "torch"). "auto" picks the first that accepts the tensors (Triton for CUDA tensors when
    installed and, for bfloat16, sm_80 or newer; else PyTorch); it never picks "cublas", which is opt-in."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _kernels.auto_choice(device, dtype)
    reason = _kernels.unavailable_on(backend, device)
    if reason is not None:
        raise RuntimeError(reason)
    return backend


def _check_number(name: str, value, *, optional: bool = False, inverted: bool = False) -> None:
    """A finite number > 0 (or None when ``optional``); ``inverted``: the kernels multiply by its float32 inverse,
    so it must be at least float32's smallest normal."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number{' or None' if optional else ''}, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        return  # dynamic=True traces Python numbers symbolically: their values are checked by the eager calls
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if inverted and value < _TINY:
        raise ValueError(f"{name} must be >= {_TINY} (the kernels multiply by 1 / {name}, a float32), got {value}")


_TINY = torch.finfo(torch.float32).tiny  # 2**-126: its inverse, 2**126, is still a finite float32


def _check_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap) -> None:  # noqa: C901 - a list
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    # under autocast every entry point casts hidden, weight and bias to the autocast dtype first (``_autocast``)
    if hidden.dtype != weight.dtype and not _autocasting(hidden):
        raise TypeError(
            f"hidden and weight must share a dtype, got hidden {hidden.dtype} and weight {weight.dtype}: run the call "
            f"under torch.autocast (as the model's own head runs in mixed precision), or cast one of them, e.g. "
            f"hidden.to({weight.dtype})"
        )
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D), got a 0-d tensor")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have a hidden size D >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 and getattr(weight, "ds_shape", None) is not None:
        raise ValueError(
            f"weight is a DeepSpeed ZeRO-3 partitioned parameter (shape {tuple(weight.shape)} on this rank, "
            f"{tuple(weight.ds_shape)} in full): it holds no data outside its module's forward. Score with "
            "fastkto.integrations.transformers.get_lm_head(model).sequence_logps(hidden, labels), which runs inside "
            "the head module's ZeRO-3 hooks, and take the loss from fastkto.loss.kto_loss / dpo_loss"
        )
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
        if bias.dtype != weight.dtype and not _autocasting(hidden):
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    devices = {t.device for t in (hidden, weight, labels) + (() if bias is None else (bias,))}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}")
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            "hidden, weight, labels and bias must hold data, but some are on the meta device (a model built under "
            "init_empty_weights / device_map='meta' and never materialized): load or move them to cpu / cuda first"
        )
    check_int("ignore_index", ignore_index)
    _check_number("temperature", temperature, inverted=True)
    _check_number("softcap", softcap, optional=True, inverted=True)


def _autocasting(hidden) -> bool:
    """True when ``_autocast`` will cast a call's floating inputs (autocast is on for hidden's device)."""
    return (isinstance(hidden, torch.Tensor) and hidden.device.type != "meta"
            and torch.is_autocast_enabled(hidden.device.type))


def _autocast(hidden, weight, bias):
    """Under ``torch.autocast`` the head runs in the autocast dtype, as an ``nn.Linear`` would there; the casts are
    ordinary autograd ops, so fp32 master weights get fp32 gradients."""
    # meta tensors have no autocast state to ask about; _check_inputs names them
    if not _autocasting(hidden):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES and t.dtype != dtype else t

    return cast(hidden), cast(weight), cast(bias)


class _FusedLogprob(torch.autograd.Function):
    """The primitive for vocab-parallel heads and sharded (DTensor) weights, whose collectives and re-gathers do not
    fit an operator's schema: the compute of ``fastkto.ops`` around them. (N, D) hidden, (V, D) weight -> (N,)
    float32 log-probabilities of the scored rows, 0 elsewhere; with ``stats`` > 0 a tuple: the log-probabilities
    and the token statistics in ``ops.FIELDS_ORDER`` (those the level computes; entropy differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, labels, impl, opts, group, vocab_offset, regather, stats=0,
                vocab_total=None):
        # the implementations choose their own precisions; autocast must not recast their products
        with torch.autocast(hidden.device.type, enabled=False):
            combine = None if group is None else functools.partial(_dist.combine_vocab_parallel, group=group)
            result = ops.forward_compute(hidden, weight, bias, labels, rows, vocab_offset, impl, opts, combine,
                                         stats=stats, vocab_total=vocab_total)
        out, lse, local = result[:3]
        fields = result[3] if stats else {}
        if regather is not None:  # a gathered DTensor weight / bias is not kept: backward gathers it again
            weight = None if regather.sharded[0] else weight
            bias = None if regather.sharded[1] else bias
        entropy = fields.get("entropy")
        ctx.save_for_backward(hidden, weight, bias, rows, local, lse, entropy)
        ctx.impl, ctx.opts, ctx.group, ctx.regather = impl, opts, group, regather
        if not stats:
            return out
        ctx.set_materialize_grads(False)  # an output without a gradient adds no term to the tiles
        others = [fields[name] for name in ops.FIELDS_ORDER[1:] if name in fields]
        ctx.mark_non_differentiable(*others)
        return (out, entropy, *others)

    @staticmethod
    def backward(ctx, grad_out, *grad_fields):
        hidden, weight, bias, rows, local, lse, entropy = ctx.saved_tensors
        if ctx.regather is not None:
            full_w, full_b = ctx.regather()
            weight = weight if full_w is None else full_w
            bias = bias if full_b is None else full_b
        grad_entropy = grad_fields[0] if grad_fields else None
        if grad_out is None and grad_entropy is None:
            return (None,) * 12
        # every shard's vocabulary contributes to each hidden state's gradient
        reduce = None if ctx.group is None else functools.partial(_dist.all_reduce_sum, group=ctx.group)
        with torch.autocast(hidden.device.type, enabled=False):
            grads = ops.backward_compute(grad_out, hidden, weight, bias, rows, local, lse, ctx.needs_input_grad[:3],
                                         ctx.impl, ctx.opts, reduce, grad_entropy=grad_entropy, entropy=entropy)
        return *grads, None, None, None, None, None, None, None, None, None


def check_labels(checks: ValueChecks, flat: torch.Tensor, ignore_index: int, vocab: int, name: str = "labels") -> int:
    """Registers the range check of ``flat`` (N,) labels and their count of scored tokens with ``checks``; returns
    its index there. Its result is that count (an int), or -1 where it was not read."""
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab))
    n_bad = bad.sum()

    def read(values):
        if values is None:
            return -1
        if values[0]:
            first = flat[bad][0].item()
            raise ValueError(f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")
        return values[1]

    return checks.add((n_bad, valid.sum()), n_bad == 0,
               f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}", read)


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
        ignore_index: label value whose positions return exactly 0, get exactly zero gradient and cost no work
            (an int64; a value in [0, V) makes that token id unscorable).
        temperature: logits are divided by it after the soft-cap (> 0).
        softcap: if set, z = softcap * tanh(z / softcap) before the temperature (Gemma-2 uses 30).
        backend: "auto" (Triton for CUDA tensors when importable, else PyTorch), "triton", "torch", or "cublas"
            (opt-in, CUDA: cuBLAS products into fp32 blocks and Triton epilogues; bitwise reproducible, not
            batch-invariant; ``fastkto.kernels.gemm_epilogue``).
        process_group: a torch.distributed group whose ranks hold the vocabulary slices (vocab-parallel head);
            all ranks pass the same hidden and labels.
        workspace_bytes: budget for temporaries (PyTorch path: tiles; Triton: split buffers); default
            ``$FASTKTO_WORKSPACE_MIB`` MiB, else 128 MiB on CUDA and 64 MiB elsewhere.

    Returns:
        float32 tensor of labels' shape. Differentiable w.r.t. hidden, weight and bias for any upstream gradient;
        gradients come back in the inputs' dtypes, accumulated in float32. Under ``torch.autocast`` hidden, weight
        and bias are first cast to the autocast dtype (as ``nn.Linear`` does there).

    Host syncs: one in eager mode (the label range check and the count of scored tokens, read together), none in
    backward. Under ``torch.compile`` none: the range check becomes a device-side assert, and since the scored
    tokens cannot be counted without a sync, every token is scored and the ignored ones are masked (output 0,
    gradient 0; the head then also works on prompt and padding tokens). With
    ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` the operator compacts them instead, at one
    sync inside it. Under ``FakeTensorMode`` nothing is read and every token counts as scored.
    """
    return _logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                     softcap=softcap, backend=backend, process_group=process_group, workspace_bytes=workspace_bytes)


TOKEN_FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    fields=("log_probs", "entropy"),
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    process_group=None,
    workspace_bytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token log-probabilities and statistics of the whole distribution, from one pass through the head.

    ``fused_logprobs``' forward, whose online log-sum-exp also carries the sums the statistics need (see
    ``fastkto.kernels.stats``); the logits are never materialized, forward or backward. With z the transformed
    logits (bias, soft-cap, temperature) of a token and p = softmax(z) over the whole vocabulary (all shards of a
    vocab-parallel head):

    - ``log_probs``: log p[label] (as ``fused_logprobs``), float32, differentiable.
    - ``entropy``: -sum p log p, float32, differentiable: its gradient joins the log-probs' in the same backward
      tiles (dz = g (onehot - p) - g_H p (z - E_p[z]), then the soft-cap / temperature chain rule), no extra pass.
    - ``mean_logits``: the mean of z over the vocabulary, float32, no gradient.
    - ``is_top1``: whether the label is the arg-max of z, bool, no gradient; ties go to the lowest index (as
      ``torch.argmax``, and TRL).
    - ``log_sum_sq_probs``: log sum p^2, float32, no gradient.

    Args: as ``fused_logprobs``, and
        fields: names from ``TOKEN_FIELDS`` to return (any order; "log_probs" is always computed). Asking only for
            "entropy" uses a cheaper kernel variant than asking for any of the other three.

    Returns:
        {name: tensor of labels' shape} for each requested field; 0 (False for ``is_top1``) at ``ignore_index``
        positions, whose gradients are exactly zero.

    Contract. Each field is within float32 rounding of a float64 reference (the sums are taken in float32 in
    max-shifted form: the entropy as log s - a / s with s = sum exp(z - m), a = sum exp(z - m)(z - m), two terms
    >= 0). Batch invariance: with the same options, workspace budget and (CPU) thread count, a token's outputs
    do not depend on the other tokens of the call on the CPU (both paths) and on CUDA's Triton path (the
    vocabulary's split and chunk boundaries and the order in which partial results combine depend on V and the
    options only; CPU calls of fewer than 16 tokens are padded, since the CPU's BLAS rounds small products
    differently). On CUDA's PyTorch path they do not hold (cuBLAS computes the logits and picks its kernel by the
    row count). A token's row of the hidden states' gradient is batch-invariant on the CPU (except for calls so
    large that the backward's worker threads' (M, D) partial gradients no longer fit the budget: fewer vocabulary
    shards are then used); on CUDA it is not, since its product is cuBLAS's: on an H200 rows computed 37 at a time
    differed from the same rows in a call of 8192 by one bf16 rounding (benchmarks/results/h200/, run 2).
    The weight's gradient is a sum over tokens, so it depends on the batch: it is deterministic (bitwise
    reproducible for the same batch), not batch-invariant.
    """
    from .kernels import stats as st

    if isinstance(fields, str):
        fields = (fields,)
    try:
        fields = tuple(fields)
    except TypeError:
        raise TypeError(f"fields must be a name or a sequence of names from {TOKEN_FIELDS}, got "
                        f"{type(fields).__name__}") from None
    if not fields:
        raise ValueError(f"fields must name at least one of {TOKEN_FIELDS}")
    for name in fields:
        if name not in TOKEN_FIELDS:
            raise ValueError(f"fields must name entries of {TOKEN_FIELDS}, got {name!r}")
    level = st.level_for(fields)
    if level == 0:
        out = _logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                        softcap=softcap, backend=backend, process_group=process_group,
                        workspace_bytes=workspace_bytes)
        return {"log_probs": out}
    out, stats = _logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                           softcap=softcap, backend=backend, process_group=process_group,
                           workspace_bytes=workspace_bytes, stats=level)
    stats["log_probs"] = out
    return {name: stats[name] for name in fields}


def _logprobs(hidden, weight, labels, *, bias, ignore_index, temperature, softcap, backend, process_group,
              workspace_bytes, scored: int | None = None, stats: int = 0):
    """``fused_logprobs``; ``scored`` is the number of labels other than ignore_index when the caller has already
    checked the labels' values (``ValueChecks``; -1: not read), None to check them here. ``stats`` > 0 (a
    ``kernels.stats`` level): returns (log-probs, {field: tensor of labels' shape}) instead."""
    hidden, weight, bias = _autocast(hidden, weight, bias)

    def checked_locally():
        _check_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap)
        budget = None
        if workspace_bytes is not None:
            _check_number("workspace_bytes", workspace_bytes)
            if not torch.compiler.is_compiling() and workspace_bytes >= 2**63:  # the operator schema: an int64
                raise ValueError(f"workspace_bytes must be < 2**63, got {workspace_bytes}")
            budget = int(workspace_bytes)
        w, b, regather = _dist.gather_for_call(weight, bias, process_group=process_group)
        return w, b, regather, resolve_backend(backend, hidden.device, hidden.dtype), budget

    if process_group is None:
        weight, bias, regather, impl_name, budget = checked_locally()
        vocab_offset, vocab_total = 0, weight.shape[0]
    else:
        # a rank that rejects its own input still joins the layout all-gather, so that no rank is left waiting
        try:
            weight, bias, regather, impl_name, budget = checked_locally()
            error = None
        except (TypeError, ValueError, RuntimeError) as err:
            error = err
        sizes = (0, 0, 0) if error else (weight.shape[0], hidden.shape[-1], labels.numel())
        labels_hash = None if error else _dist.labels_fingerprint(labels)
        layout = _dist.vocab_shard_layout(sizes[0], sizes[1], sizes[2], process_group, ok=error is None,
                                          labels_hash=labels_hash)
        if error is not None:
            raise error
        assert layout is not None  # None only for ok=False, which raised above
        vocab_offset, vocab_total = layout

    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1).long()
    if scored is None:
        checks = ValueChecks(hidden, labels)
        check_labels(checks, flat, ignore_index, vocab_total)
        (scored,) = checks.run()
    valid = None
    if scored < 0 and torch.compiler.is_compiling() and not _dynamic_shapes_traced():
        # no count on the host while compiling: every row is scored, the ignored ones with a stand-in label and
        # masked out (output 0, gradient 0). Static shapes: no graph break, no sync, CUDA-graph safe; the price is
        # the head's work on the ignored rows (prompts, padding) and a zeroed copy of the hidden states. (Fake
        # tensors outside a trace go to the operator, whose fake implementation counts every row as scored.)
        valid = flat != ignore_index
        flat, scored = torch.where(valid, flat, vocab_offset), flat.numel()
        # a prompt or padding row may hold inf / NaN (fully masked attention, fp16 overflow): zeroed, its gradient
        # terms are 0 x finite, so the weight's gradient stays clean, as in eager mode where the row is skipped
        hidden2d = torch.where(valid[:, None], hidden2d, 0.0)
    fields = {}
    if process_group is None and regather is None:
        if stats:
            res = torch.ops.fastkto.token_stats(hidden2d, weight, bias, flat, ignore_index, scored, softcap,
                                                float(temperature), budget, impl_name, stats)
            out = res[0]
            every = dict(zip(ops.FIELDS_ORDER, res[1:5]))
            fields = {name: every[name] for name in _level_fields(stats)}
        else:
            out = torch.ops.fastkto.logprobs(hidden2d, weight, bias, flat, ignore_index, scored, softcap,
                                             float(temperature), budget, impl_name)[0]
    else:
        opts = {"softcap": softcap, "temperature": float(temperature), "workspace_bytes": budget}
        rows = ops.compact_rows(flat, ignore_index, scored)
        res = _FusedLogprob.apply(hidden2d, weight, bias, rows, flat, ops.implementation(impl_name), opts,
                                  process_group, vocab_offset, regather, stats, vocab_total)
        out = res[0] if stats else res
        if stats:
            fields = dict(zip(_level_fields(stats), res[1:]))
    if valid is not None:
        out = torch.where(valid, out, 0.0)
        fields = {name: torch.where(valid, t, False if t.dtype == torch.bool else 0.0) for name, t in fields.items()}
    if not stats:
        return out.reshape(labels.shape)
    return out.reshape(labels.shape), {name: t.reshape(labels.shape) for name, t in fields.items()}


def _level_fields(stats: int) -> tuple[str, ...]:
    return ("entropy",) if stats == 1 else ops.FIELDS_ORDER


def _dynamic_shapes_traced() -> bool:
    """True while Dynamo traces with data-dependent output sizes allowed (``torch._dynamo.config.
    capture_dynamic_output_shape_ops``): the operator then compacts the scored rows itself, at one host sync."""
    return torch.compiler.is_compiling() and bool(torch._dynamo.config.capture_dynamic_output_shape_ops)


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

    Host syncs: one (with ``process_group``: one per check, beside the collectives), none while ``torch.compile``
    traces; see ``fused_logprobs``.
    """
    return _sequence_logps(hidden, weight, labels, cu_seqlens=cu_seqlens, average=average, bias=bias,
                           ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                           process_group=process_group, workspace_bytes=workspace_bytes)


def _sequence_logps(hidden, weight, labels, *, cu_seqlens, average, bias, ignore_index, temperature, softcap,
                    backend, process_group=None, workspace_bytes=None, checked=None):
    """``sequence_logps``; ``checked``: the callable ``check_sequence_values`` returned, once the caller's
    ``ValueChecks`` has run (the values of ``labels`` and ``cu_seqlens`` are then checked), or None to check here."""
    if isinstance(labels, torch.Tensor) and labels.dim() < 1:
        raise ValueError("labels must have a sequence dimension: shape (..., T), got a 0-d tensor")
    if not isinstance(average, bool):
        raise TypeError(f"average must be a bool, got {type(average).__name__}")
    scored, lengths, longest = (None, None, None) if checked is None else checked()
    if checked is None and process_group is None:
        if cu_seqlens is not None:
            _packed_shapes(hidden, labels)
        _check_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap)
        checks = ValueChecks(hidden, labels)
        result = check_sequence_values(checks, labels, cu_seqlens, ignore_index, weight.shape[0])
        checks.run()
        scored, lengths, longest = result()
    per_token = _logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        backend=backend, process_group=process_group, workspace_bytes=workspace_bytes, scored=scored,
    )
    if cu_seqlens is not None and lengths is None:
        # with a process group the layout is checked after the collective call, so that a rank that rejects it
        # has still joined the other ranks there
        lengths = _packed_lengths(hidden, labels, cu_seqlens)
        longest = None
    if lengths is not None:
        width = longest  # None while compiling: segment_sums then needs no read
        total = packing.segment_sums(per_token.reshape(-1), lengths, width)
        if not average:
            return total
        flags = labels.reshape(-1) != ignore_index
        return total / packing.segment_counts(flags, lengths, width).clamp(min=1)
    total = per_token.sum(dim=-1)
    if not average:
        return total
    count = (labels != ignore_index).sum(dim=-1).clamp(min=1)
    return total / count


def check_sequence_values(checks: ValueChecks, labels, cu_seqlens, ignore_index: int, vocab: int, *, hidden=None,
                          name: str = "labels", cu_name: str = "cu_seqlens", after_layout=None):
    """Registers the value checks of one ``sequence_logps`` pass with ``checks``: the labels' range and count of
    scored tokens, and a packed layout (``cu_seqlens``, checked against ``hidden``'s shape when given). Returns a
    callable that, once ``checks.run()`` has read them, gives ``(scored, lengths, longest)``: the scored count (-1
    when not read), the (S,) lengths of a packed layout (else None) and the longest one (None when padded or not
    read); pass it to ``_sequence_logps`` as ``checked``. ``after_layout(lengths)`` registers checks of the caller's
    between the layout's and the labels' (their errors come in that order)."""
    lengths, at_cu = None, None
    if cu_seqlens is not None:
        if hidden is not None:
            _packed_shapes(hidden, labels)
        lengths = packing.cu_seqlens_lengths(cu_seqlens, labels.shape[-1], device=labels.device, name=cu_name,
                                             tokens_name=name)
        at_cu = packing.check_cu_seqlens_values(checks, cu_seqlens, lengths, labels.shape[-1], name=cu_name,
                                                tokens_name=name)
    if after_layout is not None:
        after_layout(lengths)
    at_labels = check_labels(checks, labels.reshape(-1).long(), ignore_index, vocab, name)
    return lambda: (checks.results[at_labels], lengths, None if at_cu is None else checks.results[at_cu])


def _packed_shapes(hidden, labels) -> None:
    for name, t in (("hidden", hidden), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (labels.dim() == 1 or (labels.dim() == 2 and labels.shape[0] == 1)):
        raise ValueError(f"packed labels (cu_seqlens given) must have shape (T_total,) or (1, T_total), got "
                         f"{tuple(labels.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"packed hidden must have shape labels.shape + (D,) = {tuple(labels.shape)} + (D,) (the "
                         f"tokens of every sequence, concatenated), got {tuple(hidden.shape)}")


def _packed_lengths(hidden, labels, cu_seqlens) -> torch.Tensor:
    """The (S,) lengths of a packed call's sequences, after checking its shapes against ``cu_seqlens``."""
    _packed_shapes(hidden, labels)
    return packing.check_cu_seqlens(cu_seqlens, labels.shape[-1], device=labels.device)
