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

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from . import kernels

__all__ = ["implementation", "compact_rows", "forward_compute", "backward_compute", "scatter_rows",
           "on_fake_transient", "simulate_target", "workspace_plan_bytes"]


def implementation(name: str) -> kernels.Implementation:
    """The module that makes the tiles: a name of ``fastkto.kernels.IMPLEMENTATIONS`` (``"torch"``: chunked PyTorch,
    ``"triton"``: the fused kernels, ``"cublas"``: cuBLAS products and Triton epilogues)."""
    from . import kernels

    return kernels.load(name)


def compact_rows(labels: torch.Tensor, ignore_index: int, scored: int) -> torch.Tensor | None:
    """The (M,) int64 indices of the labels other than ``ignore_index``, or None when all N are scored.

    ``scored`` is M when the caller knows it (no host sync), or -1 (read here: one sync)."""
    n = labels.shape[0]
    if scored == n:
        return None
    if scored < 0 and _simulating(labels) and getattr(labels.fake_mode, "shape_env", None) is None:
        return None  # plain FakeTensorMode: no data, every row scored (as the operator's fake implementation)
    valid = labels != ignore_index
    if scored < 0:
        rows = valid.nonzero().squeeze(1)
        return None if rows.shape[0] == n else rows
    # sync-free given its size: the H200 runs' sync counts and stacks place every sync elsewhere
    # (benchmarks/results/h200/)
    return torch.nonzero_static(valid, size=scored).squeeze(1)


def forward_compute(hidden, weight, bias, labels, rows, vocab_offset, impl, opts, combine=None, stats=0,
                    vocab_total=None):
    """(out (N,) float32 log-probs, 0 on unscored rows; lse (M,) float32; local (M,) int64 labels - vocab_offset),
    and with ``stats`` > 0 (``kernels.stats`` levels) a fourth item: {field: (N,) tensor} of the token statistics
    (float32, ``is_top1`` bool; 0 / False on unscored rows).

    ``combine`` merges the partial statistics of vocabulary shards (vocab-parallel), or None; ``vocab_total`` is
    the whole vocabulary's size (default: weight's rows), the denominator of ``mean_logits``."""
    from .kernels import stats as st

    kept = labels if rows is None else labels.index_select(0, rows)
    local = kept - vocab_offset if vocab_offset else kept
    n = hidden.shape[0]
    vocab_total = weight.shape[0] if vocab_total is None else vocab_total
    if not kept.numel():
        empty = torch.zeros(0, device=hidden.device, dtype=torch.float32)
        out = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        if not stats:
            return out, empty, local
        return out, empty, local, _scatter_fields(_empty_fields(stats, 0, hidden.device), rows, n)
    if _simulating(hidden):
        part = _fake_forward(hidden, weight, bias, rows, local, impl, opts, stats)
    else:
        part = impl.logprob_fwd(hidden, weight, bias, rows, local, **opts, **({"stats": stats} if stats else {}))
    if combine is not None:
        if stats >= 2 and vocab_offset:  # the arg-max as a row of the whole vocabulary
            part = (*part[:6], part[6] + vocab_offset)
        part = combine(*part)
    elif stats >= 2 and vocab_offset:
        part = (*part[:6], part[6] + vocab_offset)
    logp, lse, fields = st.finish(part, kept, vocab_total)
    if rows is None:
        return (logp, lse, local) if not stats else (logp, lse, local, fields)
    out = torch.zeros(n, device=hidden.device, dtype=torch.float32).index_copy_(0, rows, logp)
    if not stats:
        return out, lse, local
    return out, lse, local, _scatter_fields(fields, rows, n)


def _empty_fields(stats, m, device) -> dict:
    names = ("entropy",) if stats == 1 else FIELDS_ORDER
    return {name: torch.zeros(m, device=device, dtype=torch.bool if name == "is_top1" else torch.float32)
            for name in names}


def _scatter_fields(fields: dict, rows, n: int) -> dict:
    if rows is None:
        return fields
    return {name: torch.zeros(n, device=t.device, dtype=t.dtype).index_copy_(0, rows, t) for name, t in fields.items()}


# the token statistics in the operators' output order
FIELDS_ORDER = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def backward_compute(grad_out, hidden, weight, bias, rows, local, lse, needs, impl, opts, reduce_hidden=None,
                     grad_entropy=None, entropy=None):
    """(d_hidden (N, D) in hidden's dtype, d_weight, d_bias), each None where ``needs`` says so.

    ``reduce_hidden`` sums the compact fp32 hidden gradient over vocabulary shards (vocab-parallel), or None.
    ``grad_entropy`` / ``entropy``: (N,) upstream gradient of the entropy field and the field itself, or None;
    their term joins the log-prob's in the same tiles. ``grad_out`` may be None when only the entropy has one."""
    need_h, need_w, need_b = needs
    m = lse.shape[0]
    grad = torch.zeros(m, device=lse.device) if grad_out is None else grad_out.float()
    if grad_out is not None and rows is not None:
        grad = grad.index_select(0, rows)
    ent = {}
    if grad_entropy is not None:
        g_ent, h_ent = grad_entropy.float(), entropy.float()
        if rows is not None:
            g_ent, h_ent = g_ent.index_select(0, rows), h_ent.index_select(0, rows)
        ent = {"grad_entropy": g_ent, "entropy": h_ent}
    bwd = _fake_backward if _simulating(hidden) else impl.logprob_bwd
    d_hidden, d_weight, d_bias = bwd(
        hidden, weight, bias, rows, local, lse, grad,
        need_hidden=need_h, need_weight=need_w, need_bias=need_b, **opts, **ent,
        **({"impl": impl} if bwd is _fake_backward else {}),
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



# ----------------------------------------------------------------------------- fake tensors: memory simulation
# A memory simulation (``python -m benchmarks.scale``) runs a training step on fake tensors and counts what it
# sees allocated. Two things of the head would escape it: a custom operator's fake implementation runs below the
# simulator's dispatch mode (its inner allocations are invisible), and the tile loop's buffers live only inside
# one call. So the fake paths compute, with the real path's own planning functions, the bytes the real call holds
# beyond what the simulator sees, and report them to the hooks of ``on_fake_transient`` as a transient: present at
# that moment, gone when the call returns. Nothing runs the tile loop on fake tensors.

_TRANSIENT_HOOKS: list = []
_TARGET: list = [None]  # (device type, implementation name, SM count) while ``simulate_target`` is active


class _Handle:
    def __init__(self, hook):
        self.hook = hook

    def remove(self) -> None:
        if self.hook in _TRANSIENT_HOOKS:
            _TRANSIENT_HOOKS.remove(self.hook)


def on_fake_transient(hook) -> _Handle:
    """Calls ``hook(name: str, nbytes: int)`` whenever a fake-tensor call of the primitive stands for a real call
    that would hold ``nbytes`` more than the fake tensors it returns or allocates, at that moment (its tile
    workspace; for the operators' fake implementations also their inner temporaries). Returns a handle with
    ``remove()``."""
    _TRANSIENT_HOOKS.append(hook)
    return _Handle(hook)


@contextlib.contextmanager
def simulate_target(device_type: str = "cuda", impl: str = "triton", sms: int = 132):
    """Within the block, fake-tensor calls report the temporaries of ``impl`` (a name of
    ``fastkto.kernels.IMPLEMENTATIONS``: "triton" or "torch") on a ``device_type`` device with ``sms``
    multiprocessors (the Triton forward's split count follows it), whatever device the fake tensors claim (a
    simulation on a CPU-only machine plans for the GPU it models)."""
    from . import kernels

    if impl not in kernels.IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {tuple(kernels.IMPLEMENTATIONS)}, got {impl!r}")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    old, _TARGET[0] = _TARGET[0], (device_type, impl, int(sms))
    try:
        yield
    finally:
        _TARGET[0] = old


def _simulating(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) and not torch.compiler.is_compiling()


def _report(name: str, nbytes: int) -> None:
    for hook in list(_TRANSIENT_HOOKS):
        hook(name, int(nbytes))


def _target(device: torch.device, impl_name: str) -> tuple[str, str, int]:
    return _TARGET[0] or (device.type, impl_name, 132)


def _impl_name(impl) -> str:
    from . import kernels

    return impl if isinstance(impl, str) else kernels.name_of(impl)


def workspace_plan_bytes(direction: str, impl: str, device_type: str, tokens: int, vocab: int, dim: int,
                         dtype: torch.dtype, *, softcap: bool = False, gathered: bool = False, has_bias: bool = False,
                         need_weight: bool = True, workspace_bytes: int | None = None, sms: int = 132,
                         stats: int = 0) -> int:
    """Bytes of the temporaries one real call allocates and frees inside the implementation, from its own plan.

    direction "forward": Triton, the vocabulary splits' statistics (k x splits x M fp32 for k partials, the split
    count by the kernel's rule, which depends on V only; ``sms`` is kept for the callers) and, with several
    splits, the merge's temporaries; PyTorch, the forward tile buffers. ``stats``: the token statistics level.
    "backward": the tile loop's workspace (``tiled.workspace_buffers`` of the plan ``tiled.plan_tiles`` makes),
    on the CPU for each worker thread, with the workers' (M, D) fp32 partials.
    ``tokens`` is M (scored rows); the per-token vectors and the outputs are not included. Assumes CUDA has the
    fp32-accumulating 16-bit GEMMs (recent torch), as ``benchmarks/roofline.py`` does."""
    from .kernels import tiled

    m = int(tokens)
    if m == 0 or vocab == 0:
        return 0
    budget = tiled.default_workspace_bytes(device_type) if workspace_bytes is None else int(workspace_bytes)
    if impl == "cublas":  # blocks of fp32 raw logits in the workspace, in both directions
        from .kernels import gemm_epilogue as ge

        maker = dataclasses.replace(ge.TILE_MAKER, align=ge.GPU_ALIGN)
        call = tiled.CallShape(m, vocab, dim, dtype, dtype, "cuda", gathered, False, False, softcap, need_weight,
                               has_bias, True, stats=stats if direction == "forward" else 0)
        plan = tiled.plan_tiles(call, maker, budget, False)
        return _buffers(tiled.workspace_buffers(*plan, call, maker, backward=direction == "backward"))
    if impl == "triton":
        from .kernels import fused_logprob as fl

        if direction == "forward":
            return fl.forward_buffer_bytes(m, vocab, dtype, budget, stats, gpu=True)
        maker = dataclasses.replace(fl.TILE_MAKER, align=fl.GPU_ALIGN)
        call = tiled.CallShape(m, vocab, dim, dtype, dtype, "cuda", gathered, False, False, softcap, need_weight,
                               has_bias, True)
        plan = tiled.plan_tiles(call, maker, budget, False)
        return _buffers(tiled.workspace_buffers(*plan, call, maker))
    from .kernels import cpu_threads
    from .kernels import torch_chunked as tc

    if device_type == "cpu":
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # the GEMM probe multiplies real tiny tensors (cached after the first call)
            gemm, fused = tiled.gemm_dtype(dtype, torch.device("cpu")), tiled.fp32_gemm_support("cpu")[1]
    else:
        gemm, fused = dtype, True
    call = tiled.CallShape(m, vocab, dim, dtype, gemm, device_type, gathered, False, False, softcap, need_weight,
                           has_bias, fused, stats=stats if direction == "forward" else 0)
    by_budget = device_type == "cpu"
    if direction == "forward":  # the forward's shards do not depend on the tokens, nor split the budget by them
        workers = cpu_threads.forward_workers(call, tc.TILE_MAKER)
        shards = cpu_threads.shards(vocab, workers, tc.TILE_MAKER) if workers > 1 else [(0, vocab)]
        total = 0
        for v0, v1 in shards:
            shard = dataclasses.replace(call, vocab=v1 - v0)
            plan = tiled.plan_tiles(shard, tc.TILE_MAKER, budget // workers, by_budget)
            total += _buffers(tiled.workspace_buffers(*plan, shard, tc.TILE_MAKER, backward=False))
        return total
    workers = cpu_threads.backward_workers(call, budget, tc.TILE_MAKER)
    shards = cpu_threads.shards(vocab, workers, tc.TILE_MAKER) if workers > 1 else [(0, vocab)]
    per_worker = cpu_threads.per_worker_budget(call, budget, workers) if workers > 1 else budget
    total = (workers - 1) * m * dim * 4 if direction == "backward" else 0
    for v0, v1 in shards:
        shard = dataclasses.replace(call, vocab=v1 - v0)
        plan = tiled.plan_tiles(shard, tc.TILE_MAKER, per_worker, by_budget)
        total += _buffers(tiled.workspace_buffers(*plan, shard, tc.TILE_MAKER, backward=direction == "backward"))
    return total


def _buffers(bufs: dict) -> int:
    from .kernels import tiled

    return tiled.buffers_nbytes({k: v for k, v in bufs.items() if k != tiled.VECTORS})  # VECTORS: room, not a buffer


def _plan(direction, hidden, weight, bias, m, impl, opts, need_weight=True, stats=0) -> int:
    device_type, name, sms = _target(hidden.device, _impl_name(impl))
    return workspace_plan_bytes(direction, name, device_type, m, weight.shape[0], weight.shape[1], hidden.dtype,
                                softcap=opts["softcap"] is not None, gathered=m != hidden.shape[0],
                                has_bias=bias is not None, need_weight=need_weight,
                                workspace_bytes=opts["workspace_bytes"], sms=sms, stats=stats)


def _fake_forward(hidden, weight, bias, rows, local, impl, opts, stats=0):
    """``impl.logprob_fwd`` on fake tensors: its partial statistics (row_max, sum_exp, target, ...) without the
    loop; the workspace is reported."""
    from .kernels import stats as st

    m = local.shape[0]
    if _TRANSIENT_HOOKS:
        _report("fastkto forward workspace", _plan("forward", hidden, weight, bias, m, impl, opts, stats=stats))
    return tuple(hidden.new_empty(m, dtype=torch.float32) for _ in range(st.n_partials(stats)))


def _fake_backward(hidden, weight, bias, rows, local, lse, grad, *, need_hidden, need_weight, need_bias, impl,
                   softcap, temperature, workspace_bytes, grad_entropy=None, entropy=None):
    """``impl.logprob_bwd`` on fake tensors: its outputs (the (M, D) fp32 hidden gradient, the weight and bias
    gradients) without the loop; the workspace is reported while they exist, as in the real loop."""
    m = local.shape[0]
    d_hidden = hidden.new_empty(m, hidden.shape[1], dtype=torch.float32) if need_hidden else None
    d_weight = torch.empty_like(weight) if need_weight else None
    d_bias = torch.empty_like(bias) if need_bias and bias is not None else None
    if _TRANSIENT_HOOKS:
        opts = _opts(softcap, temperature, workspace_bytes)
        _report("fastkto backward workspace", _plan("backward", hidden, weight, bias, m, impl, opts, need_weight))
    return d_hidden, d_weight, d_bias


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
def _logprobs_fake(hidden, weight, bias, labels, ignore_index, scored, softcap, temperature, workspace_bytes, impl):
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
    if _TRANSIENT_HOOKS and isinstance(m, int):
        # inside the real call, beyond its outputs: the workspace, the statistics (3 M fp32), the kept labels
        opts = _opts(softcap, temperature, workspace_bytes)
        _report("fastkto forward workspace",
                _plan("forward", hidden, weight, bias, m, impl, opts) + 12 * m + (8 * m if m != n else 0))
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
def _logprobs_backward_fake(grad_out, hidden, weight, bias, labels, rows, lse, softcap, temperature, workspace_bytes,
                            impl, need_hidden, need_weight, need_bias):
    def like(t, needed):
        return t.new_empty(t.shape) if needed and t is not None else hidden.new_empty(0)

    m = lse.shape[0]
    if _TRANSIENT_HOOKS and isinstance(m, int):
        # inside the real call, beyond its outputs: the loop runs with the (M, D) fp32 hidden gradient and the
        # workspace alive, then the workspace is freed and the output (N, D) is made from the fp32 gradient
        ws = _plan("backward", hidden, weight, bias, m, impl, _opts(softcap, temperature, workspace_bytes),
                   need_weight)
        extra = 8 * m + ws
        if need_hidden:
            d32, out = m * hidden.shape[1] * 4, hidden.numel() * hidden.element_size()
            same = hidden.dtype == torch.float32 and m == hidden.shape[0]  # the fp32 gradient is the output
            extra = 8 * m + (ws if same else d32 + max(ws - out, 0))
        _report("fastkto backward workspace", extra)

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


# ------------------------------------------------------------------------------ the operators with token statistics
@torch.library.custom_op("fastkto::token_stats", mutates_args=())
def token_stats(
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
    stats: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logprobs`` with the token statistics of the same pass (``kernels.stats``): hidden (N, D), weight (V, D),
    bias (V,) or None, labels (N,) int64, ``stats`` 1 (entropy) or 2 (every field) ->
    (out (N,) float32 log-probs, entropy (N,) float32, mean_logits (N,) float32, is_top1 (N,) bool,
    log_sum_sq_probs (N,) float32, lse, rows); fields are 0 / False where ignored, and a field the level does not
    compute is an empty (0,) tensor; lse and rows as ``logprobs``'."""
    with torch.autocast(hidden.device.type, enabled=False):
        rows = compact_rows(labels, ignore_index, scored)
        out, lse, _, fields = forward_compute(hidden, weight, bias, labels, rows, 0, implementation(impl),
                                              _opts(softcap, temperature, workspace_bytes), stats=stats)
    values = tuple(fields[name] if name in fields else
                   hidden.new_zeros(0, dtype=torch.bool if name == "is_top1" else torch.float32)
                   for name in FIELDS_ORDER)
    if rows is None:
        if scored < 0:
            return out, *values, lse, torch.arange(labels.shape[0], device=labels.device)
        rows = labels.new_zeros(0, dtype=torch.int64)
    return out, *values, lse, rows


@token_stats.register_fake
def _(hidden, weight, bias, labels, ignore_index, scored, softcap, temperature, workspace_bytes, impl, stats):
    out, lse, rows = _logprobs_fake(hidden, weight, bias, labels, ignore_index, scored, softcap, temperature,
                                    workspace_bytes, impl)
    n = hidden.shape[0]
    values = tuple(hidden.new_empty(n if (stats >= 2 or name == "entropy") else 0,
                                    dtype=torch.bool if name == "is_top1" else torch.float32)
                   for name in FIELDS_ORDER)
    return out, *values, lse, rows


@torch.library.custom_op("fastkto::token_stats_backward", mutates_args=())
def token_stats_backward(
    grad_out: torch.Tensor,
    grad_entropy: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    softcap: float | None,
    temperature: float,
    workspace_bytes: int | None,
    impl: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_out_i out_i + grad_entropy_i entropy_i from ``token_stats``' saved (rows, lse) and
    entropy (N,), in one pass of the backward's tiles. ``grad_out`` / ``grad_entropy``: (N,) float32, or an empty
    (0,) tensor for an output without a gradient. Returns (d_hidden, d_weight, d_bias) as ``logprobs_backward``."""
    all_rows = rows.numel() == 0 and lse.shape[0] == hidden.shape[0]
    kept_rows = None if all_rows else rows
    local = labels if kept_rows is None else labels.index_select(0, kept_rows)
    has_ent = grad_entropy.numel() > 0
    with torch.autocast(hidden.device.type, enabled=False):
        grads = backward_compute(grad_out if grad_out.numel() else None, hidden, weight, bias, kept_rows, local, lse,
                                 (need_hidden, need_weight, need_bias and bias is not None),
                                 implementation(impl), _opts(softcap, temperature, workspace_bytes),
                                 grad_entropy=grad_entropy if has_ent else None, entropy=entropy if has_ent else None)
    return tuple(hidden.new_empty(0) if g is None else g.contiguous() for g in grads)


@token_stats_backward.register_fake
def _(grad_out, grad_entropy, hidden, weight, bias, labels, rows, lse, entropy, softcap, temperature,
      workspace_bytes, impl, need_hidden, need_weight, need_bias):
    return _logprobs_backward_fake(grad_out, hidden, weight, bias, labels, rows, lse, softcap, temperature,
                                   workspace_bytes, impl, need_hidden, need_weight, need_bias)


def _stats_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, _, _, softcap, temperature, workspace_bytes, impl, _ = inputs
    entropy, lse, rows = output[1], output[5], output[6]
    ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, entropy)
    ctx.options = (softcap, temperature, workspace_bytes, impl)


def _stats_backward(ctx, grad_out, grad_entropy, *_):
    hidden, weight, bias, labels, rows, lse, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if (grad_out is None and grad_entropy is None) or not (need_h or need_w or need_b):
        return (None,) * 11
    none = hidden.new_zeros(0, dtype=torch.float32)
    if grad_entropy is not None and grad_entropy.numel() == 0:
        grad_entropy = None  # the level computed no entropy
    d_hidden, d_weight, d_bias = torch.ops.fastkto.token_stats_backward(
        none if grad_out is None else grad_out, none if grad_entropy is None else grad_entropy, hidden, weight, bias,
        labels, rows, lse, entropy, *ctx.options, need_h, need_w, need_b and bias is not None,
    )
    return (d_hidden if need_h else None, d_weight if need_w else None, d_bias if need_b else None) + (None,) * 8


torch.library.register_autograd("fastkto::token_stats", _stats_backward, setup_context=_stats_setup_context)
