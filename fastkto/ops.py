"""The primitive as PyTorch operators: ``torch.ops.fastkto.logprobs`` and ``torch.ops.fastkto.logprobs_backward``.

Registered with ``torch.library.custom_op`` (torch >= 2.4; fastkto needs 2.11), each with a fake implementation
and the pair linked by ``register_autograd``, so that

* ``torch.compile(fullgraph=True)`` traces a call as one node per direction (no graph break; the tile loop and the
  Triton kernels run inside the node, opaque to Dynamo and Inductor),
* ``FakeTensorMode`` (memory simulation of large models) runs a call without data: the fake implementations
  return the outputs' shapes and never run the tile loop.

The operators take already-checked arguments (``fastkto.logprob`` checks them and names bad ones); the math and
the two implementations are those of ``fastkto.kernels``. The same compute functions also serve the
``autograd.Function`` in ``fastkto.logprob`` that vocab-parallel heads and sharded (DTensor) weights use, since
their collectives and re-gathers do not fit an operator's schema.

Scored tokens: a label equal to ``ignore_index`` costs no work. Which rows remain (``rows``, compacted indices)
needs their count on the host to size the products. ``scored`` passes that count when the caller already knows
it (``fastkto.logprob`` reads it with the label checks, one host sync per loss call for all its passes); with
``scored=-1`` the operator reads it itself (a host sync inside the node: the compiled path), and its fake
implementation gives ``rows`` a data-dependent size.
"""

from __future__ import annotations

from types import ModuleType

import torch

__all__ = ["implementation", "compact_rows", "forward_compute", "backward_compute", "scatter_rows"]


def implementation(name: str) -> ModuleType:
    """The module that makes the tiles: ``"torch"`` (chunked PyTorch) or ``"triton"`` (the kernels)."""
    if name == "triton":
        from .kernels import fused_logprob

        return fused_logprob
    from .kernels import torch_chunked

    return torch_chunked


def compact_rows(labels: torch.Tensor, ignore_index: int, scored: int) -> torch.Tensor | None:
    """The (M,) int64 indices of the labels other than ``ignore_index``, or None when all N are scored.

    ``scored`` is M when the caller knows it (no host sync: ``nonzero_static``), or -1 (read here: one sync)."""
    n = labels.shape[0]
    if scored == n:
        return None
    valid = labels != ignore_index
    if scored < 0:
        rows = valid.nonzero().squeeze(1)
        return None if rows.shape[0] == n else rows
    return torch.nonzero_static(valid, size=scored).squeeze(1)


def forward_compute(hidden, weight, bias, labels, rows, vocab_offset, impl, opts, combine=None):
    """(out (N,) float32 log-probs, 0 on unscored rows; lse (M,) float32; local (M,) int64 labels - vocab_offset)

    ``combine`` merges the (row_max, sum_exp, target) statistics of vocabulary shards (vocab-parallel), or None."""
    kept = labels if rows is None else labels.index_select(0, rows)
    local = kept - vocab_offset if vocab_offset else kept
    if not kept.numel():
        empty = torch.zeros(0, device=hidden.device, dtype=torch.float32)
        return torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32), empty, local
    row_max, sum_exp, target = impl.logprob_fwd(hidden, weight, bias, rows, local, **opts)
    if combine is not None:
        row_max, sum_exp, target = combine(row_max, sum_exp, target)
    lse = row_max + torch.log(sum_exp)
    logp = target - lse
    if rows is None:
        return logp, lse, local
    out = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    return out.index_copy_(0, rows, logp), lse, local


def backward_compute(grad_out, hidden, weight, bias, rows, local, lse, needs, impl, opts, reduce_hidden=None):
    """(d_hidden (N, D) in hidden's dtype, d_weight, d_bias), each None where ``needs`` says so.

    ``reduce_hidden`` sums the compact fp32 hidden gradient over vocabulary shards (vocab-parallel), or None."""
    need_h, need_w, need_b = needs
    grad = grad_out.float()
    grad = grad if rows is None else grad.index_select(0, rows)
    d_hidden, d_weight, d_bias = impl.logprob_bwd(
        hidden, weight, bias, rows, local, lse, grad,
        need_hidden=need_h, need_weight=need_w, need_bias=need_b, **opts,
    )
    if d_hidden is not None:
        if reduce_hidden is not None:
            reduce_hidden(d_hidden)
        if rows is None:
            d_hidden = d_hidden.to(hidden.dtype)
        else:
            d_hidden = scatter_rows(hidden.new_zeros(hidden.shape), rows, d_hidden, opts["workspace_bytes"])
    return d_hidden, d_weight, d_bias


def scatter_rows(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, workspace_bytes: int | None):
    """out[rows] = src (fp32, compact) in out's dtype; a 16-bit cast goes through the workspace a chunk at a
    time, so that no (M, D) temporary sits beside the fp32 gradient."""
    from .kernels.tiled import default_workspace_bytes

    if src.dtype == out.dtype:
        return out.index_copy_(0, rows, src)
    budget = default_workspace_bytes(out.device) if workspace_bytes is None else workspace_bytes
    step = max(1, budget // (src.shape[1] * out.element_size()))
    for r0 in range(0, rows.numel(), step):
        out.index_copy_(0, rows[r0:r0 + step], src[r0:r0 + step].to(out.dtype))
    return out


def _opts(softcap, temperature, workspace_bytes) -> dict:
    return {"softcap": softcap, "temperature": float(temperature), "workspace_bytes": workspace_bytes}


# ------------------------------------------------------------------------------------------------- the operators
@torch.library.custom_op("fastkto::logprobs", mutates_args=())
def logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    scored: int,
    softcap: float | None,
    temperature: float,
    workspace_bytes: int | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, D), weight (V, D), bias (V,) or None, labels (N,) int64 in [0, V) or ignore_index ->
    (out (N,) float32 log-probs, 0 where ignored; lse (M,) float32; rows (M,) int64 scored rows, or (0,) when
    ``scored`` == N and every row is scored, lse then (N,)). ``scored``: M, or -1 to count here."""
    with torch.autocast(hidden.device.type, enabled=False):  # the implementations choose their own precisions
        rows = compact_rows(labels, ignore_index, scored)
        out, lse, _ = forward_compute(hidden, weight, bias, labels, rows, 0, implementation(impl),
                                      _opts(softcap, temperature, workspace_bytes))
    if rows is None:
        if scored < 0:  # the fake implementation promised rows of the data-dependent size: give all N
            return out, lse, torch.arange(labels.shape[0], device=labels.device)
        rows = labels.new_zeros(0, dtype=torch.int64)
    return out, lse, rows


@logprobs.register_fake
def _(hidden, weight, bias, labels, ignore_index, scored, softcap, temperature, workspace_bytes, impl):
    n = hidden.shape[0]
    if scored == n:
        m, n_rows = n, 0
    elif scored >= 0:
        m = n_rows = scored
    else:
        mode = torch._guards.detect_fake_mode()
        if mode is not None and mode.shape_env is not None:
            m = n_rows = torch.library.get_ctx().new_dynamic_size()  # traced (Dynamo): the count is data
        else:
            m = n_rows = n  # plain FakeTensorMode (no data, no symbols): every row scored, the most memory
    f32 = torch.float32
    return hidden.new_empty(n, dtype=f32), hidden.new_empty(m, dtype=f32), labels.new_empty(n_rows, dtype=torch.int64)


@torch.library.custom_op("fastkto::logprobs_backward", mutates_args=())
def logprobs_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    lse: torch.Tensor,
    softcap: float | None,
    temperature: float,
    workspace_bytes: int | None,
    impl: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_out_i * out_i from ``logprobs``' saved (rows, lse): (d_hidden (N, D), d_weight (V, D),
    d_bias (V,)) in the inputs' dtypes, accumulated in float32; an output not needed is an empty (0,) tensor."""
    all_rows = rows.numel() == 0 and lse.shape[0] == hidden.shape[0]
    kept_rows = None if all_rows else rows
    local = labels if kept_rows is None else labels.index_select(0, kept_rows)
    with torch.autocast(hidden.device.type, enabled=False):
        grads = backward_compute(grad_out, hidden, weight, bias, kept_rows, local, lse,
                                 (need_hidden, need_weight, need_bias and bias is not None),
                                 implementation(impl), _opts(softcap, temperature, workspace_bytes))
    # contiguous, as the fake implementation promises (an input's permuted layout is not kept)
    return tuple(hidden.new_empty(0) if g is None else g.contiguous() for g in grads)


@logprobs_backward.register_fake
def _(grad_out, hidden, weight, bias, labels, rows, lse, softcap, temperature, workspace_bytes, impl, need_hidden,
      need_weight, need_bias):
    def like(t, needed):
        return t.new_empty(t.shape) if needed and t is not None else hidden.new_empty(0)

    return like(hidden, need_hidden), like(weight, need_weight), like(bias, need_bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, _, _, softcap, temperature, workspace_bytes, impl = inputs
    _, lse, rows = output
    ctx.save_for_backward(hidden, weight, bias, labels, rows, lse)
    ctx.options = (softcap, temperature, workspace_bytes, impl)


def _backward(ctx, grad_out, _grad_lse, _grad_rows):
    hidden, weight, bias, labels, rows, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_out is None or not (need_h or need_w or need_b):
        return (None,) * 10
    d_hidden, d_weight, d_bias = torch.ops.fastkto.logprobs_backward(
        grad_out, hidden, weight, bias, labels, rows, lse, *ctx.options, need_h, need_w, need_b and bias is not None,
    )
    return (d_hidden if need_h else None, d_weight if need_w else None, d_bias if need_b else None) + (None,) * 7


torch.library.register_autograd("fastkto::logprobs", _backward, setup_context=_setup_context)
