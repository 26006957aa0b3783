"""A full KTO / DPO training step of a real transformers model, simulated on fake tensors: peak memory per GPU.

    python -m benchmarks.scale --model qwen2.5-32b --world 8 --batch 4 --seq 2048 --head fastkto
    python -m benchmarks.scale --model llama-3.1-70b --world 16 --batch 2 --seq 4096 --head naive --json
    python -m benchmarks.scale --model qwen2.5-32b --head naive,trl,fastkto --curve   # largest tokens per GPU

No GPU and no memory are needed: the model is built from its published hyper-parameters (no hub access) on
``FakeTensorMode``, sharded with FSDP2 over a fake process group of ``--world`` ranks (rank 0 is simulated; the
others hold the same shapes), and one training step runs as the ``docs/scale-out.md`` recipe runs it:

    policy forward (grad)  ->  KL pass (no grad)  [-> reference passes, --ref held]  ->  loss  ->  backward
    ->  AdamW step (foreach, as on CUDA)  ->  zero_grad

fp32 master weights, bf16 compute (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), ``fully_shard``
per decoder layer, then the backbone, the untied head and the root (a tied head stays in the root, one parameter
with the embedding; the naive and TRL heads then use the root's unsharded weight, fastkto gathers the shard);
activation checkpointing (non-reentrant) unless ``--no-checkpointing``; the reference precomputed (log-probs in
the batch) or held (a frozen bf16 FSDP2 copy).

Heads (``--head``):
  naive    the gathered bf16 head weight (kept by autograd until backward, as FSDP keeps a head in its root
           unit), bf16 logits, their fp32 copy (soft-capped for Gemma-2), log_softmax, gather.
  trl      TRL 1.16's trainers' fused head (``add_fused_lm_head``: ``trl.kernels.ChunkedLogProbFunction`` on the
           gathered bf16 head, 4096-token x 32768-vocabulary tiles, fp32 gradient accumulators), as it runs on
           CUDA (``trl_on_cuda``): the scored rows copied, folds and fp32-output GEMMs in place.
  trl-logits  bf16 logits, log-probs by TRL's ``selective_log_softmax`` (its row loop; older TRL trainers).
  fastkto  ``KTOLoss`` / ``DPOLoss`` on the sharded head (a DTensor, cast to bf16 per shard: fastkto gathers it
           per call and frees it). The tile workspace of the path that would run (``--impl triton``: the CUDA
           kernels' split buffers and their backward plan; ``torch``: the PyTorch tiles) is accounted explicitly:
           the fake paths report the bytes the real call holds beyond its outputs (``fastkto.ops.on_fake_transient``,
           computed with the real planning functions) and the tracker adds them at that moment.

The curve (``--curve``): the largest micro-batch B x 4096 per GPU that fits an 80 GB and a 141 GB card. A
fake step costs about a second per layer on one core, so the curve does not simulate the full depth: it simulates
B = 1, 2 and 8 at 4 and 6 layers and predicts every B at the model's depth from the event logs (``extrapolate``:
each event's bytes are affine in B, L and B L; the layers between the second and the second-last change by the
same amount per layer, so their highest point is at one of those). ``tests/test_scale.py`` checks the prediction
against full-depth steps; ``--verify HEAD:B`` adds such a check to a curve; ``--depths full`` simulates the full
depth instead (``interpolate`` between two micro-batches).

The tracker (``StepTracker``) is a dispatch mode that records every storage an operation creates (and FSDP2's
storage resizes), freed when the storage dies, and keeps the event log; the peak's live set is rebuilt from the
log and classified: parameters (sharded fp32 + a held reference), gradients (sharded fp32), optimizer state,
FSDP buffers (all-gathered bf16 layers and unsharded gradients before their reduce-scatter), the loss head
(gathered head weight and its gradient, logits or fastkto's outputs and workspace; everything the head's forward
and backward allocate) and activations (everything else: checkpoints, saved tensors, recomputation, gradients in
flight). GB = 1e9 bytes.

Known artefacts handled: the first AdamW step on DTensor parameters makes global-shape temporaries (sharding
propagation) and creates the state: an untracked warm-up step runs first, so the tracked step is a steady-state
one. Attention runs as SDPA's fused kernel (O(T) memory, as flash-attention on a GPU; Gemma-2's attention
soft-cap is ignored for memory). A Qwen3 MoE's experts run with uniform routing (every expert gets
tokens x top-k / experts rows), since a fake tensor has no router decisions. The CUDA caching allocator's
fragmentation, the CUDA context and NCCL buffers are not simulated: ``--overhead`` (default 6 GB) is added
before comparing with a card's capacity.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch

GB = 1e9
DEFAULT_OVERHEAD_GB = 6.0  # CUDA context + NCCL communicators + allocator fragmentation, per GPU (stated, not derived)
CARDS = {"80GB": 80e9, "141GB": 141e9}
CATEGORIES = ("parameters", "gradients", "optimizer state", "optimizer temporaries", "FSDP buffers", "activations",
              "loss head")


# --------------------------------------------------------------------------------------------------------- models
def model_config(name: str, layers: int | None = None):
    """A transformers config with the model's published sizes (no hub access). ``layers`` overrides the depth
    (tests and quick runs)."""
    import transformers as tf

    common = dict(dtype="float32", use_cache=False)
    if name == "qwen2.5-32b":
        cfg = tf.Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                             num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072,
                             rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, **common)
    elif name == "llama-3.1-70b":
        cfg = tf.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                             rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False, **common)
    elif name == "gemma-2-27b":
        cfg = tf.Gemma2Config(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                              num_key_value_heads=16, head_dim=128, vocab_size=256000, max_position_embeddings=8192,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=144,
                              sliding_window=4096, tie_word_embeddings=True, **common)
    elif name == "qwen3-30b-a3b":
        cfg = tf.Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                vocab_size=151936, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                                mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1e6,
                                tie_word_embeddings=False, **common)
    elif name == "tiny-llama":  # cross-checks against real tensors
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512,
                             tie_word_embeddings=False, **common)
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if layers is not None:
        cfg.num_hidden_layers = int(layers)
        if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
            cfg.layer_types = cfg.layer_types[:layers]
    return cfg


MODELS = ("qwen2.5-32b", "llama-3.1-70b", "gemma-2-27b", "qwen3-30b-a3b")


def _uniform_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Qwen3 MoE experts with uniform routing: each of the E experts gets N k / E of the N k (token, expert) rows
    (fake tensors carry no router decisions), run as a grouped GEMM (``torch.bmm`` over the experts) on the
    gathered (N k, D) rows; the weighted rows are summed back into (N, D). The saved activations are those of a
    balanced batch."""
    n, d = hidden_states.shape
    k, e = top_k_index.shape[1], self.num_experts
    per = max(1, n * k // e)
    rows = hidden_states.repeat_interleave(k, 0)[: per * e]  # the gathered expert inputs (index_select's shape)
    gate, up = torch.bmm(rows.view(e, per, d), self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    y = torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2)).reshape(-1, d)
    y = y * top_k_weights.reshape(-1, 1)[: per * e].to(y.dtype)
    token = torch.arange(per * e, device=y.device) // k
    return torch.zeros_like(hidden_states).index_add_(0, token, y.to(hidden_states.dtype))


SIM_ATTENTION = "fastkto_sim_fused"


def _flash_like_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention as a fused kernel runs it (O(T) memory, no mask tensor): SDPA with ``is_causal``. The
    values are not those of Gemma-2's soft-capped or sliding-window attention; its memory is flash-attention's."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                                           scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(SIM_ATTENTION, _flash_like_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SIM_ATTENTION, lambda *args, **kwargs: None)


def build(cfg, mesh, *, checkpointing: bool, trainable: bool = True):
    """The model on fake tensors, ``fully_shard`` per layer, the backbone, the head (untied) and the root."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    _register_attention()
    # built and sharded on the meta device outside the fake mode (transformers' constructors make real scalar
    # tensors); ``to_empty`` then gives every parameter and buffer a fake tensor of its shard's size
    with unset_fake_temporarily():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                     dtype=torch.float32 if trainable else torch.bfloat16)
        model.set_attn_implementation(SIM_ATTENTION)
        for layer in model.model.layers:
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            if experts is not None and hasattr(experts, "gate_up_proj"):
                experts.forward = _uniform_experts_forward.__get__(experts)
        if trainable:
            model.train()
            if checkpointing:
                if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.eval()
            model.requires_grad_(False)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        if not cfg.tie_word_embeddings:  # a tied head stays in the root with the embedding: one parameter
            fully_shard(model.model, mesh=mesh, mp_policy=mp)
            fully_shard(model.lm_head, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device="cpu")
    for i, layer in enumerate(model.model.layers):
        # labels the events with the layer that makes them: its forward, and its backward (from the moment its
        # output's gradient exists: the recomputation, the gradients; with FSDP2's unshard of the layer below);
        # the curve's depth extrapolation keeps the first two and the last two layers' events
        layer.register_forward_pre_hook(lambda *args, i=i: _LAYER.__setitem__(0, i), prepend=True)
        layer.register_forward_hook(lambda module, args, out, i=i: _label_backward(out, i))
    return model


def _label_backward(out, i: int) -> None:
    t = out[0] if isinstance(out, tuple) else out
    if isinstance(t, torch.Tensor) and t.requires_grad:
        t.register_hook(lambda grad: _LAYER.__setitem__(0, i))


_LAYER = [-1]  # the decoder layer whose forward (or checkpoint recomputation) ran last; -1 before the first


# -------------------------------------------------------------------------------------------------------- tracker
def _local(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _storages(out):
    for t in torch.utils._pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            t = _local(t)
            try:
                yield t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue


_FSDP_OPS = ("all_gather", "reduce_scatter", "chunk_cat", "split_with_sizes_copy", "fsdp")


def _in_fsdp() -> bool:
    """Whether FSDP2's own code made this call: its all-gather and reduce-scatter buffers, the unsharded
    parameters and the casts of its hooks are made with plain operators, known only by their caller."""
    f = sys._getframe(2)
    while f is not None:
        if "/fsdp/" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


class StepTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every live storage created by an operation (and FSDP2's storage resizes), the transient
    bytes fastkto's fake paths report, the peak and the event log to rebuild the peak's live set from.

    ``phase`` (set by the step) and ``head_nodes`` (autograd nodes of the loss head) label what is allocated."""

    def __init__(self):
        super().__init__()
        self.key_of: dict[int, int] = {}  # storage address -> key, while alive
        self.info: dict[int, tuple[int, str, str]] = {}  # key -> (bytes, allocation tag, phase)
        self.size: dict[int, int] = {}
        self.events: list[tuple[int, int]] = []
        self.event_phase: list[int] = []  # per event: an index into phase_names (the curve's trace alignment)
        self.event_layer: list[int] = []  # per event: the decoder layer last entered (-1: none yet this step)
        self.phase_names: list[str] = []
        self._phase_index: dict[str, int] = {}
        self.current = self.peak = self.start_bytes = 0
        self.peak_event = -1
        self.peak_phase = ""
        self._phase_name = "setup"
        self.phase_seconds: dict[str, float] = {}
        self._phase_t0 = time.perf_counter()
        self.head = False
        self.head_nodes: set = set()
        self._next = 0
        self._pending: list | None = None

    @property
    def phase(self) -> str:
        return self._phase_name

    @phase.setter
    def phase(self, name: str) -> None:
        now = time.perf_counter()
        self.phase_seconds[self._phase_name] = self.phase_seconds.get(self._phase_name, 0.0) + now - self._phase_t0
        self._phase_name, self._phase_t0 = name, now

    # -- labels
    def _tag(self, func) -> str:
        if self.head:
            return "head"
        node = torch._C._current_autograd_node()
        if node is not None and node in self.head_nodes:
            return "head"
        name = str(func)
        if any(k in name for k in _FSDP_OPS) or _in_fsdp():
            return "fsdp"
        if self.phase == "optimizer":
            return "optimizer"
        return "other:" + name

    def _phase(self) -> str:
        node = torch._C._current_autograd_node()
        if self.phase == "backward":
            return "backward: loss head" if node is not None and node in self.head_nodes else "backward: layers"
        return self.phase + (": loss head" if self.head else "")

    # -- accounting
    def _add(self, key: int, delta: int) -> None:
        self.current += delta
        self.events.append((key, delta))
        phase = self._phase()
        index = self._phase_index.get(phase)
        if index is None:
            index = self._phase_index[phase] = len(self.phase_names)
            self.phase_names.append(phase)
        self.event_phase.append(index)
        self.event_layer.append(_LAYER[0])
        if self.current > self.peak:
            self.peak, self.peak_event, self.peak_phase = self.current, len(self.events) - 1, phase

    def _free(self, key: int, addr: int) -> None:
        if self.key_of.get(addr) == key:
            del self.key_of[addr]
        size = self.size.pop(key, 0)
        if size:
            self._add(key, -size)

    def register(self, storage, tag: str, phase: str | None = None) -> int | None:
        addr = storage._cdata
        if addr in self.key_of:
            return None
        key, self._next = self._next, self._next + 1
        nbytes = storage.nbytes()
        self.key_of[addr] = key
        self.info[key] = (nbytes, tag, phase or self.phase)
        self.size[key] = nbytes
        weakref.finalize(storage, self._free, key, addr)
        if nbytes:
            self._add(key, nbytes)
        return key

    def key(self, t) -> int | None:
        try:
            return self.key_of.get(_local(t).untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            return None

    def transient(self, name: str, nbytes: int) -> None:
        """Bytes present now and gone at once (fastkto's workspace inside a fake call). Reported from inside an
        operator's fake implementation, they are counted on top of that operator's outputs."""
        if self._pending is not None:
            self._pending.append((name, nbytes))
        elif nbytes > 0:
            key, self._next = self._next, self._next + 1
            self.info[key] = (nbytes, "head", self.phase)
            self._add(key, nbytes)
            self._add(key, -nbytes)

    def resized(self, storage, new: int) -> None:
        addr = storage._cdata
        key = self.key_of.get(addr)
        if key is None:
            if new:
                key = self.register(storage, self._tag(""), None)
                # register counted the new size already
            return
        old = self.size.get(key, 0)
        self.size[key] = new
        self.info[key] = (max(new, self.info[key][0]), self.info[key][1], self.info[key][2])
        if new != old:
            self._add(key, new - old)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._pending = []
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            pending, self._pending = self._pending, None
        tag = None
        for st in _storages(out):
            if st._cdata not in self.key_of:
                tag = tag or self._tag(func)
                self.register(st, tag)
        for name, nbytes in pending:
            self.transient(name, nbytes)
        return out

    # -- the peak's live set
    def live_at_peak(self) -> dict[int, int]:
        return self.live_at(self.peak_event)

    def live_at(self, event: int) -> dict[int, int]:
        """The storages alive just after event ``event`` (an index into ``events``) and their bytes."""
        live: dict[int, int] = {}
        for key, delta in self.events[: event + 1]:
            live[key] = live.get(key, 0) + delta
        return {k: v for k, v in live.items() if v > 0}


@contextlib.contextmanager
def track_resizes(tracker: StepTracker):
    """FSDP2 frees and re-allocates its unsharded parameters with ``untyped_storage().resize_``, not an operator."""
    original = torch.UntypedStorage.resize_

    def resize_(self, size):
        out = original(self, size)
        tracker.resized(self, int(size))
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


def head_graph(loss: torch.Tensor, stop: list[torch.Tensor]) -> set:
    """The autograd nodes between ``loss`` and the backbone's outputs ``stop`` (the loss head's backward)."""
    stops = {t.grad_fn for t in stop if t is not None and t.grad_fn is not None}
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return seen


# ----------------------------------------------------------------------------------------------------------- step
@dataclass
class Setup:
    model: str = "qwen2.5-32b"
    world: int = 8
    batch: int = 4  # sequences per rank per micro-batch (policy; the KL pass has as many)
    seq: int = 2048
    head: str = "fastkto"  # naive | trl | fastkto
    impl: str = "triton"  # fastkto's path to account for: triton (CUDA) | torch
    loss: str = "kto"  # kto | dpo
    ref: str = "precomputed"  # precomputed | held
    checkpointing: bool = True
    optimizer: str = "fused"  # fused | foreach | for-loop (AdamW's implementations)
    layers: int | None = None
    device: str = "fake"  # fake (FakeTensorMode) | real (CPU tensors: cross-checks at small sizes)
    target: str = "cuda"  # the device whose fastkto path is planned (cpu: the cross-checks against real tensors)


@dataclass
class Result:
    setup: dict
    params: int
    peak_bytes: int
    peak_phase: str
    breakdown: dict = field(default_factory=dict)
    seconds: float = 0.0
    start_bytes: int = 0  # live when the tracked step began (parameters, optimizer state, the batch)
    phase_seconds: dict = field(default_factory=dict)
    trace: tuple | None = field(default=None, repr=False)  # (tracker, gradient keys): the curve's interpolation

    def as_dict(self) -> dict:
        return {"setup": self.setup, "params": self.params, "peak_gb": self.peak_bytes / GB,
                "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase,
                "breakdown_gb": {k: v / GB for k, v in self.breakdown.items()}, "seconds": round(self.seconds, 2),
                "phase_seconds": {k: round(v, 2) for k, v in self.phase_seconds.items()}}


@contextlib.contextmanager
def fake_world(world: int):
    """A fake process group of ``world`` ranks (this process is rank 0; collectives move no data) and its 1-D
    mesh, destroyed on exit. Refuses to replace a process group the caller made."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("benchmarks.scale makes its own fake process group; a process group already exists")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def _head_weight(model):
    inner = model.model
    return inner.embed_tokens.weight if model.config.tie_word_embeddings else model.lm_head.weight


HEADS = ("naive", "trl", "trl-logits", "fastkto")
TRL_OUTPUTS = ("log_probs", "entropy", "mean_logits")  # what TRL 1.16's KTOTrainer asks its fused head for


def _trl_fused_logps(hidden, weight, labels, softcap):
    """Sequence log-prob sums as TRL 1.16's trainers compute them (``trl.trainer.utils.add_fused_lm_head``):
    ``ChunkedLogProbFunction`` on the scored rows (on CUDA ``hidden[mask]``, a copy saved for backward), 4096-token
    x 32768-vocabulary bf16 tiles, fp32 gradient accumulators for the hidden states and the head weight."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = labels != -100
    rows = hidden.reshape(-1, hidden.shape[-1])
    if _TRL_CUDA[0]:
        # on CUDA TRL scores hidden[mask], a copy; every position is scored here, and a boolean index has no
        # shape on fake tensors, so the copy is all the rows
        rows = rows.clone()
    lp = ChunkedLogProbFunction.apply(rows, weight, None, labels.clamp(min=0).reshape(-1), 1.0,
                                      _CHUNKED_LOGPROB_CHUNK_SIZE, softcap, 1.0, TRL_OUTPUTS)[0]
    return lp.view(mask.shape).masked_fill(~mask, 0).sum(-1)


_TRL_CUDA = [False]  # set while a fake step plans for CUDA (TRL's Triton folds and its compacted rows)


@contextlib.contextmanager
def trl_on_cuda():
    """TRL's fused head as it runs on CUDA: compacted rows, each tile folded in place by a Triton kernel and the
    gradients accumulated by fp32-output GEMMs (no temporaries). On fake CPU tensors TRL would take its PyTorch
    fold and cast each 4096 x 32768 tile to fp32 for the GEMMs, which a GPU does not, so these become no-ops here
    (values do not matter on fake tensors; memory is the buffers TRL itself allocates)."""
    import trl.kernels.chunked_logprob as ck

    saved = ck._forward_tile, ck._backward_tile, ck._addmm_fp32
    # the folds, and the fp32-output GEMM that accumulates the gradients on CUDA (elsewhere TRL casts each tile to
    # fp32 first): in place, nothing allocated
    ck._forward_tile = ck._backward_tile = ck._addmm_fp32 = lambda *args, **kwargs: None
    _TRL_CUDA[0] = True
    try:
        yield
    finally:
        ck._forward_tile, ck._backward_tile, ck._addmm_fp32 = saved
        _TRL_CUDA[0] = False


def _naive_logps(hidden, weight, labels, softcap, how):
    """Sequence log-prob sums of (B, T, D) hidden through a gathered (V, D) bf16 head the way trainers do."""
    from fastkto import reference

    if how == "trl":
        return _trl_fused_logps(hidden, weight, labels, softcap)
    # bf16 (B, T, V): outputs.logits, which a trainer holds (here: this local) while it computes the loss
    logits = hidden @ weight.T
    if how == "trl-logits":
        from trl.trainer.utils import selective_log_softmax

        per_token = selective_log_softmax(reference.transform_logits(logits, softcap=softcap), labels)
    else:
        z = reference.transform_logits(logits.float(), softcap=softcap)
        # every label is scored here, so no mask (reference.label_logprobs' would add (B, T) tensors to the peak)
        per_token = torch.log_softmax(z, -1).gather(-1, labels[..., None]).squeeze(-1)
    return per_token.sum(-1)


def run_step(s: Setup, tracker: StepTracker | None = None, around=None) -> Result:
    """Builds the model and runs one tracked training step (after an untracked optimizer warm-up). ``around``: a
    context-manager factory to run the tracked step in (the cross-checks' independent measurement)."""
    return run_steps(s, [(s.batch, s.seq)], tracker=tracker, around=around)[0]


def run_steps(s: Setup, sizes, *, tracker: StepTracker | None = None, around=None, stop=None) -> list[Result]:
    """One build of ``s``'s model, then one tracked step per (batch, seq) or (batch, seq, head) of ``sizes`` (in
    order; each a steady-state step: the optimizer state exists). ``stop(result)`` ends the sweep early when it
    returns True; ``sizes`` may be a generator that reads the results so far (through ``stop``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastkto import ops

    if s.head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {s.head!r}")
    if s.loss not in ("kto", "dpo"):
        raise ValueError(f"loss must be kto or dpo, got {s.loss!r}")
    if s.optimizer not in ("fused", "foreach", "for-loop"):
        raise ValueError(f"optimizer must be fused, foreach or for-loop, got {s.optimizer!r}")
    if s.ref not in ("precomputed", "held"):
        raise ValueError(f"ref must be precomputed or held, got {s.ref!r}")
    t0 = time.perf_counter()
    cfg = model_config(s.model, s.layers)
    fake = s.device == "fake"
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    target = ops.simulate_target(s.target, s.impl) if fake else contextlib.nullcontext()
    trl = trl_on_cuda() if fake and s.target == "cuda" else contextlib.nullcontext()
    results = []
    with fake_world(s.world) as mesh, mode, target, trl:
        torch.manual_seed(0)
        model = build(cfg, mesh, checkpointing=s.checkpointing)
        n_params = sum(p.numel() for p in model.parameters())  # DTensors: the global count
        ref_model = build(cfg, mesh, checkpointing=False, trainable=False) if s.ref == "held" else None
        if not fake:
            with torch.no_grad():
                for p in list(model.parameters()) + ([] if ref_model is None else list(ref_model.parameters())):
                    _local(p).normal_(0, 0.02)
        params = [p for p in model.parameters() if p.requires_grad]
        kind = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
        opt = torch.optim.AdamW(params, lr=1e-6, **kind[s.optimizer])
        for p in params:  # warm-up: the state exists and DTensor's propagation caches are filled, untracked
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        build_seconds = time.perf_counter() - t0
        for i, (b, t, *head) in enumerate(sizes):
            size = Setup(**{**s.__dict__, "batch": b, "seq": t, "head": head[0] if head else s.head})
            if size.head not in HEADS:  # sizes may be a generator: checked as it comes
                raise ValueError(f"head must be one of {HEADS}, got {size.head!r}")
            r = _tracked_step(size, cfg, n_params, model, ref_model, params, opt,
                              tracker if i == 0 and tracker is not None else StepTracker(), around)
            r.phase_seconds = {"build": round(build_seconds, 2) if i == 0 else 0.0, **r.phase_seconds}
            r.seconds += build_seconds if i == 0 else 0.0
            results.append(r)
            if stop is not None and stop(r):
                break
    return results


def _tracked_step(s, cfg, n_params, model, ref_model, params, opt, tracker, around) -> Result:
    from fastkto import ops

    t0 = time.perf_counter()
    tracker.phase = "setup"
    _LAYER[0] = -1
    softcap = getattr(cfg, "final_logit_softcapping", None)
    b, t, v = s.batch, s.seq, cfg.vocab_size
    ids = torch.randint(0, v, (b, t))
    labels = torch.randint(0, v, (b, t))
    kl_ids = torch.randint(0, v, (b, t))
    ref_logps = torch.zeros(b)
    desirable = torch.arange(b) % 2 == 0
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()  # frees happen when the last reference goes, as in the real step (no cycle-collector delay)
    try:
        with (around() if around else contextlib.nullcontext()), tracker, track_resizes(tracker):
            for p in model.parameters():
                tracker.register(_local(p).untyped_storage(), "parameters")
            for st in opt.state.values():
                for x in st.values():
                    if isinstance(x, torch.Tensor):
                        tracker.register(_local(x).untyped_storage(), "optimizer state")
            if ref_model is not None:
                for p in ref_model.parameters():
                    tracker.register(_local(p).untyped_storage(), "parameters")
            for x in (ids, labels, kl_ids, ref_logps, desirable):
                tracker.register(x.untyped_storage(), "activations")
            hook = ops.on_fake_transient(tracker.transient)
            tracker.start_bytes = tracker.current
            try:
                loss, stop = _forward(s, tracker, model, ref_model, ids, labels, kl_ids, ref_logps, desirable,
                                      softcap)
                tracker.head_nodes = head_graph(loss, stop)
                del stop
                tracker.phase = "backward"
                loss.backward()
                del loss
                grads = {tracker.key(p.grad) for p in params if p.grad is not None}
                tracker.phase = "optimizer"
                opt.step()
                opt.zero_grad(set_to_none=True)
                tracker.phase = "done"
            finally:
                hook.remove()
    finally:
        if gc_was:
            gc.enable()
    setup = dict(s.__dict__)
    setup["layers"] = cfg.num_hidden_layers
    setup["tokens_per_gpu"] = s.batch * s.seq
    phases = {k: v for k, v in tracker.phase_seconds.items() if k != "setup"}
    trace = Trace.of(tracker, grads, cfg.num_hidden_layers)
    breakdown = dict(zip(CATEGORIES, (int(x) for x in trace.by_category[tracker.peak_event])))
    return Result(setup, n_params, tracker.peak, tracker.peak_phase, breakdown, time.perf_counter() - t0,
                  tracker.start_bytes, phases, trace=trace)


def _category(tracker: StepTracker, grads: set, key: int) -> str:
    _, tag, _ = tracker.info[key]
    if key in grads:
        return "gradients"
    if tag in ("parameters", "optimizer state", "activations"):
        return tag
    return {"head": "loss head", "fsdp": "FSDP buffers", "optimizer": "optimizer temporaries"}.get(tag, "activations")


@dataclass
class Trace:
    """A tracked step's event log as arrays: after each event, the live bytes of each category (``CATEGORIES``
    order), the event's phase and its storage key. Two steps that differ only in the micro-batch make the same
    events with sizes affine in it; ``interpolate`` uses that."""
    by_category: object  # (events, categories) int64
    phase: object  # (events,) int: index into phase_names
    phase_names: list
    keys: object  # (events,) int64
    layer: object = None  # (events,) int: the decoder layer last entered (-1: none yet)
    layers: int = 0

    @classmethod
    def of(cls, tracker: StepTracker, grads: set, layers: int = 0) -> Trace:
        import numpy as np

        n = len(tracker.events)
        keys = np.fromiter((k for k, _ in tracker.events), dtype=np.int64, count=n)
        deltas = np.fromiter((d for _, d in tracker.events), dtype=np.int64, count=n)
        index = {c: i for i, c in enumerate(CATEGORIES)}
        cat_of_key = np.zeros(tracker._next, dtype=np.int64)
        for key in tracker.info:
            cat_of_key[key] = index[_category(tracker, grads, key)]
        cat = cat_of_key[keys]
        by_category = np.stack([np.cumsum(np.where(cat == i, deltas, 0)) for i in range(len(CATEGORIES))], axis=1)
        return cls(by_category, np.asarray(tracker.event_phase, dtype=np.int64), list(tracker.phase_names), keys,
                   np.asarray(tracker.event_layer, dtype=np.int64), layers)

    def aligned(self, compress: bool, ends: bool = False):
        """Indices of the events to align with another step's, and their signature (phase, sign of the change).
        Events under ``TRACE_MIN_BYTES`` are left out: a first step makes a few 8-byte constants that later steps
        reuse. ``compress``: each run of loss-head events is replaced by its highest point (TRL's head loops once
        per 4096-token chunk, so its event count grows with the tokens; each full chunk's iteration reaches the
        same height, affine in the tokens). ``ends``: only the events outside the decoder layers and those of the
        first two and last two layers (``extrapolate``); the signature then names which of the four."""
        import numpy as np

        total = self.by_category.sum(1)
        deltas = np.diff(total, prepend=0)
        big = np.abs(deltas) >= TRACE_MIN_BYTES
        head = np.array(["loss head" in name for name in self.phase_names], dtype=bool)[self.phase]
        L = self.layers
        role = np.full(len(total), -9, dtype=np.int64)  # -9: a middle layer's event, left out with ends
        for layer, r in ((-1, -1), (0, 0), (1, 1), (L - 2, 2), (L - 1, 3)):
            role[self.layer == layer] = r
        keep = role != -9 if ends else np.ones(len(total), dtype=bool)
        if ends:  # registering the parameters and optimizer state: one event per tensor, more with depth
            setup = np.flatnonzero(self.phase == _index(self.phase_names, "setup"))
            keep[setup[:-1]] = False
        # runs merged into their highest point: the loss head's (compress); the optimizer step's with ends (fused
        # AdamW groups its tensors, more groups with depth)
        merge = (head & compress) | (ends & (self.phase == _index(self.phase_names, "optimizer")))
        idx = np.flatnonzero((big | merge) & keep)
        if merge.any():
            cuts = np.flatnonzero(np.diff(merge[idx].astype(np.int8)) | np.diff(self.phase[idx])) + 1
            kept = []
            for seg in np.split(idx, cuts):
                kept.append(seg[np.argmax(total[seg])][None] if len(seg) and merge[seg[0]] else seg)
            idx = np.concatenate(kept)
        sign = np.where(merge[idx], 0, np.sign(deltas[idx]))
        rl = role[idx] if ends else np.zeros(len(idx), dtype=np.int64)
        return idx, [(self.phase_names[p], int(g), int(r)) for p, g, r in zip(self.phase[idx], sign, rl)]


TRACE_MIN_BYTES = 1024


def _index(names: list, name: str) -> int:
    return names.index(name) if name in names else -2


def interpolate(a: Result, b: Result):
    """A function of the micro-batch (sequences per GPU) that returns the peak bytes, its phase and its breakdown,
    from two steps of the same model and head that differ only in the micro-batch (``a.setup["batch"]`` <
    ``b.setup["batch"]``). Each event's live bytes are affine in the micro-batch (every size is batch x a constant,
    plus constants), so the events' bytes at any micro-batch follow from the two steps, and the peak is their
    maximum. Raises ValueError when the two event logs do not align."""
    import numpy as np

    ta, tb = a.trace, b.trace
    ba, bb = a.setup["batch"], b.setup["batch"]
    if not ba < bb:
        raise ValueError(f"interpolate needs two micro-batches in increasing order, got {ba} and {bb}")
    (ia, sa), (ib, sb) = ta.aligned(False), tb.aligned(False)
    exact = sa == sb
    if not exact:
        (ia, sa), (ib, sb) = ta.aligned(True), tb.aligned(True)
    if sa != sb:
        raise ValueError(f"the two steps' event logs do not align ({len(sa)} and {len(sb)} events after merging "
                         "the loss head's runs): simulate each micro-batch instead")
    names_a = [name for name, *_ in sa]
    ca, cb = ta.by_category[ia].astype(np.float64), tb.by_category[ib].astype(np.float64)
    slope = (cb - ca) / (bb - ba)

    def at(batch: int):
        cats = ca + slope * (batch - ba)
        e = int(np.argmax(cats.sum(1)))
        breakdown = dict(zip(CATEGORIES, (float(x) for x in cats[e])))
        return float(cats[e].sum()), names_a[e], breakdown

    at.exact = exact
    return at


def _forward(s, tracker, model, ref_model, ids, labels, kl_ids, ref_logps, desirable, softcap):
    """The step's forward passes; returns the loss and the backbone outputs where the loss head begins."""
    from fastkto.distributed import gather_sharded
    from fastkto.integrations.transformers import hidden_states
    from fastkto.loss import DPOLoss, KTOLoss, dpo_loss, kto_kl, kto_loss

    weight = _head_weight(model)
    ref_weight = None if ref_model is None else _head_weight(ref_model)
    tracker.phase = "policy forward"
    hidden = hidden_states(model, ids)
    kl_hidden = ref_hidden = ref_kl_hidden = None
    with torch.no_grad():
        if s.loss == "kto":
            tracker.phase = "KL pass"
            kl_hidden = hidden_states(model, kl_ids)
        if ref_model is not None:
            tracker.phase = "reference pass"
            ref_hidden = hidden_states(ref_model, ids)
            if s.loss == "kto":
                ref_kl_hidden = hidden_states(ref_model, kl_ids)
    tracker.phase = "loss"
    tracker.head = True
    try:
        if s.head == "fastkto":
            w16 = weight.to(torch.bfloat16)  # a DTensor: each rank casts its shard; fastkto gathers per call
            rw = None if ref_weight is None else ref_weight
            if s.loss == "kto":
                kw = dict(kl_hidden=kl_hidden, kl_labels=labels)
                if ref_model is None:
                    kw.update(ref_logps=ref_logps, kl_ref_logps=ref_logps)
                else:
                    kw.update(ref_hidden=ref_hidden, ref_weight=rw, kl_ref_hidden=ref_kl_hidden)
                out = KTOLoss(beta=0.1, softcap=softcap)(hidden, w16, labels, desirable, **kw)
            else:
                kw = dict(ref_logps=ref_logps) if ref_model is None else dict(ref_hidden=ref_hidden, ref_weight=rw)
                out = DPOLoss(beta=0.1, softcap=softcap)(hidden, w16, labels, **kw)
            loss = out.loss
        else:
            how = s.head
            now = _head_weight(model)
            if model.config.tie_word_embeddings and not hasattr(now, "_local_tensor"):
                w16 = now  # the root's unsharded bf16 embedding, held since its forward: the model's own head
            else:
                w16 = gather_sharded(weight.to(torch.bfloat16))[0]  # kept for backward, as a root-unit head is
            policy = _naive_logps(hidden, w16, labels, softcap, how)
            with torch.no_grad():
                ref = ref_logps
                if ref_model is not None:
                    rw16 = gather_sharded(ref_weight)[0]
                    ref = _naive_logps(ref_hidden, rw16, labels, softcap, how)
                if s.loss == "kto":
                    kl_pol = _naive_logps(kl_hidden, w16.detach(), labels, softcap, how)
                    kl_ref = ref_logps if ref_model is None else _naive_logps(ref_kl_hidden, rw16, labels, softcap,
                                                                               how)
                    z0 = kto_kl(kl_pol, kl_ref)
                del ref_hidden, ref_kl_hidden
            if s.loss == "kto":
                loss = kto_loss(policy, ref, desirable, kl=z0, beta=0.1).loss
            else:
                loss = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta=0.1).loss
            del policy, w16
    finally:
        tracker.head = False
    return loss, [hidden]


# ------------------------------------------------------------------------------------------------------ head only
def head_only(tokens: int, vocab: int, dim: int, *, head: str = "fastkto", impl: str = "triton",
              target: str = "cuda", softcap: float | None = None) -> dict:
    """One policy pass of the loss head alone on fake tensors: bf16 hidden (N, D) and weight (V, D), both with
    gradients, ``KTOLoss`` (kl=0) or the naive head, backward. Returns bytes: ``peak`` above the inputs, and
    ``weight_grad`` (V D 2, the head gradient every method returns), for comparisons with
    ``benchmarks.memory_model``, which leaves it out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastkto import ops
    from fastkto.loss import KTOLoss, kto_loss

    tracker = StepTracker()
    with FakeTensorMode(), ops.simulate_target(target, impl):
        hidden = torch.empty(1, tokens, dim, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(vocab, dim, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.zeros(1, tokens, dtype=torch.long)
        desirable, ref = torch.tensor([True]), torch.zeros(1)
        hook = ops.on_fake_transient(tracker.transient)
        try:
            with tracker, track_resizes(tracker):
                for t in (hidden, weight, labels, desirable, ref):
                    tracker.register(t.untyped_storage(), "activations")
                tracker.start_bytes = tracker.current
                tracker.phase = "loss"
                if head == "fastkto":
                    loss = KTOLoss(softcap=softcap)(hidden, weight, labels, desirable, ref_logps=ref, kl=0.0).loss
                else:
                    loss = kto_loss(_naive_logps(hidden, weight, labels, softcap, head), ref, desirable,
                                    kl=torch.zeros(())).loss
                tracker.phase = "backward"
                loss.backward()
                del loss
        finally:
            hook.remove()
    return {"peak": tracker.peak - tracker.start_bytes, "weight_grad": vocab * dim * 2, "phase": tracker.peak_phase}


# ----------------------------------------------------------------------------------------------------------- curve
def extrapolate(results: list[Result]):
    """A function of (micro-batch, depth) that returns the peak bytes, its phase and its breakdown, from steps of
    the same model and head at two micro-batches x two depths (or one micro-batch x two depths), all at least 4
    layers. Each event's live bytes are affine in the micro-batch B and the depth L together with their product
    (parameters, gradients and optimizer state grow with L, checkpoints with B L, a layer's activations and the
    head with B). Within the decoder layers the bytes change by the same amount from one layer to the next, so the
    highest point of the middle layers is at the second or the second-last layer: the events of the first two and
    last two layers and those outside the layers are kept, aligned, and fitted exactly. Raises ValueError when the
    event logs do not align."""
    import numpy as np

    pts = [(r.setup["batch"], r.trace.layers) for r in results]
    batches, depths = sorted({b for b, _ in pts}), sorted({d for _, d in pts})
    if len(depths) != 2 or len(batches) > 2 or len(set(pts)) != len(pts) or len(pts) != 2 * len(batches) or \
            depths[0] < 4:
        raise ValueError(f"extrapolate needs steps at two depths >= 4 x one or two micro-batches, got {pts}")
    for compress in (False, True):
        al = [r.trace.aligned(compress, ends=True) for r in results]
        if all(sig == al[0][1] for _, sig in al):
            break
    else:
        raise ValueError("the steps' event logs do not align (first two and last two layers, the loss head's runs "
                         "merged): simulate the full depth instead")

    def basis(b, d):
        return [1.0, b, d, b * d] if len(batches) == 2 else [1.0, d]

    m = np.array([basis(b, d) for b, d in pts])
    y = np.stack([r.trace.by_category[idx].astype(np.float64) for r, (idx, _) in zip(results, al)])
    coef = np.linalg.solve(m, y.reshape(len(pts), -1)).reshape(m.shape[1], *y.shape[1:])
    names = [name for name, *_ in al[0][1]]

    def at(batch: int, layers: int):
        cats = np.tensordot(np.array(basis(batch, layers)), coef, 1)
        e = int(np.argmax(cats.sum(1)))
        return float(cats[e].sum()), names[e], dict(zip(CATEGORIES, (float(x) for x in cats[e])))

    at.exact = not compress
    return at


CURVE_SEQ = 4096
# the two micro-batches simulated per head; every other one follows from their event logs. Not 1: a batch of one
# makes a few tensors contiguous for free (size-1 dimensions), so its log differs; it is simulated directly when
# the smaller simulated size does not fit the smallest card
CURVE_SIZES = (2, 8)
CURVE_MAX_BATCH = 64


CURVE_DEPTHS = (4, 6)  # the two depths simulated; the model's own depth is extrapolated from them


def curve(base: Setup, overhead: float, heads=("naive", "trl", "fastkto"), sizes=CURVE_SIZES, seq: int = CURVE_SEQ,
          max_batch: int = CURVE_MAX_BATCH, depths=CURVE_DEPTHS, verify=(), log=None) -> list[dict]:
    """For each head of ``heads``, the peak per GPU at every micro-batch of 1..``max_batch`` sequences of ``seq``
    tokens, at the model's depth (``base.layers`` or its own), and for each card of ``CARDS`` the largest tokens
    per GPU whose peak plus ``overhead`` bytes fits (0: none).

    Simulated: micro-batches 1 and ``sizes`` at the two ``depths`` (shallow copies of the model: seconds per step);
    every micro-batch at the full depth follows from their event logs (``extrapolate``; micro-batch 1 from its own
    two, since a batch of one makes a few tensors contiguous for free). ``depths=None``: the full depth is simulated
    at ``sizes`` (and at 1 when the smaller does not fit the smallest card) and interpolated (``interpolate``).
    ``verify``: (head, batch) pairs also simulated at the full depth, whose simulated and predicted peaks are both
    recorded."""
    b1, b2 = sizes
    if not 1 < b1 < b2:
        raise ValueError(f"sizes must be two increasing micro-batches above 1, got {sizes}")
    full = base.layers or model_config(base.model).num_hidden_layers
    got: list[Result] = []

    def collect(r):
        got.append(r)
        if log:
            log(r)
        return False

    if depths is not None:
        for depth in depths:
            run_steps(Setup(**{**base.__dict__, "layers": depth}),
                      [(b, seq, h) for h in heads for b in (1, b1, b2)], stop=collect)
        if verify:
            run_steps(Setup(**{**base.__dict__, "layers": full}), [(b, seq, h) for h, b in verify], stop=collect)
    else:
        smallest = min(CARDS.values())

        def plan():
            for head in heads:
                yield b1, seq, head
                yield b2, seq, head
                if interpolate(got[-2], got[-1])(b1)[0] + overhead > smallest:
                    yield 1, seq, head
            for head, b in verify:
                yield b, seq, head

        run_steps(Setup(**{**base.__dict__, "layers": full}), plan(), stop=collect)
    out = []
    for head in heads:
        mine = [r for r in got if r.setup["head"] == head]
        direct = {r.setup["batch"]: r for r in mine if r.setup["layers"] == full}
        at, how, exact = _predictor(mine, direct, sizes, depths, full)
        by_depth = {r.setup["layers"]: r.params for r in mine}
        if full not in by_depth:  # parameters are affine in the depth too
            (d1, p1), (d2, p2) = sorted(by_depth.items())[:2]
            by_depth[full] = p1 + (p2 - p1) * (full - d1) // (d2 - d1)
        out.append(_head_curve(base, head, at, direct, how, exact, full, by_depth[full], sizes, depths, seq,
                               max_batch, overhead))
    return out


def _predictor(mine: list, direct: dict, sizes, depths, full: int):
    """``at(batch)`` -> (peak bytes, phase, breakdown) or None at the full depth, from one head's steps."""
    b1, b2 = sizes
    if depths is not None:
        shallow = [r for r in mine if r.setup["layers"] != full]
        big = extrapolate([r for r in shallow if r.setup["batch"] in (b1, b2)])
        one = extrapolate([r for r in shallow if r.setup["batch"] == 1])
        return (lambda batch: (one if batch == 1 else big)(batch, full)), "extrapolated", big.exact
    inner = interpolate(direct[b1], direct[b2])

    def at(batch):
        if batch == 1:
            r = direct.get(1)
            return (r.peak_bytes, r.peak_phase, r.breakdown) if r else None
        return inner(batch)

    return at, "interpolated", inner.exact


def _head_curve(base: Setup, head: str, at, direct: dict, how: str, exact: bool, layers: int, params: int,
                sizes, depths, seq: int, max_batch: int, overhead: float) -> dict:
    """One head's curve: ``at(batch)`` predicts (peak bytes, phase, breakdown) or None; ``direct``: the steps
    simulated at the full depth, by micro-batch."""
    points = []
    for batch in range(1, max_batch + 1):
        r = direct.get(batch)
        pred = at(batch)
        if pred is None:
            continue
        peak, phase, breakdown = pred
        point = {"tokens_per_gpu": batch * seq, "batch": batch, "seq": seq, "peak_gb": peak / GB,
                 "peak_phase": phase, "breakdown_gb": {k: v / GB for k, v in breakdown.items()},
                 "how": "simulated" if r is not None and how == "interpolated" and batch in (1, *sizes) else how,
                 "simulated": r is not None}
        if r is not None:
            point.update(simulated_peak_gb=r.peak_bytes / GB, simulated_phase=r.peak_phase,
                         seconds=round(r.seconds, 1))
        points.append(point)
        if peak + overhead > max(CARDS.values()) and batch >= max(direct, default=0):
            break
    checks = [{"batch": p["batch"], "simulated_gb": p["simulated_peak_gb"], "predicted_gb": p["peak_gb"],
               "simulated_phase": p["simulated_phase"], "predicted_phase": p["peak_phase"]}
              for p in points if p["simulated"] and p["how"] != "simulated"]
    return {"setup": {**base.__dict__, "head": head, "seq": seq, "layers": layers}, "params": params,
            "overhead_gb": overhead / GB, "method": how, "micro_batches": [1, *sizes], "depths": depths,
            "aligned_exactly": exact, "points": points, "checks": checks,
            "largest_tokens_per_gpu": largest_fitting(points, overhead), "max_batch": max_batch}


def largest_fitting(points: list[dict], overhead: float) -> dict[str, int]:
    """For each card of ``CARDS``, the most tokens per GPU of ``points`` (in increasing size) such that it and every
    smaller point fit: peak + ``overhead`` bytes <= capacity (0: none)."""
    fits = {}
    for card, cap in CARDS.items():
        fitting = 0
        for p in points:
            if p["peak_gb"] * GB + overhead > cap:
                break
            fitting = p["tokens_per_gpu"]
        fits[card] = fitting
    return fits


def curve_command(c: dict) -> str:
    """The command line that makes curve ``c`` (and the other heads of its run)."""
    st = c["setup"]
    sizes = c.get("interpolated_from", list(CURVE_SIZES))
    cmd = f"python -m benchmarks.scale --model {st['model']} --world {st['world']} --head naive,trl,fastkto --curve"
    if tuple(sizes) != CURVE_SIZES:
        cmd += f" --curve-sizes {sizes[0]},{sizes[1]}"
    return cmd


def report(curves: list[dict], out_dir) -> str:
    """Writes ``curve.md`` (the largest tokens per GPU per model, head and card; the peaks at chosen micro-batches
    with their breakdown; the interpolation's checks) and ``curve.png`` (peak per GPU + overhead against tokens per
    GPU, one panel per model) under ``out_dir``; returns the markdown."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_model: dict = {}
    for c in curves:
        by_model.setdefault((c["setup"]["model"], c["setup"]["world"]), []).append(c)
    overhead = curves[0]["overhead_gb"]
    seq = curves[0]["setup"]["seq"]
    lines = [f"Largest micro-batch per GPU (tokens, B x {seq}) whose simulated peak + {overhead:g} GB overhead (CUDA "
             "context, NCCL, allocator fragmentation: stated, not simulated) fits the card, B = 1, 2, 3, ...; FSDP2 "
             "over W GPUs, bf16 compute, fp32 master weights, fused AdamW, activation checkpointing, KTO with the KL "
             "pass, reference log-probs precomputed. Heads: `naive` (bf16 logits, fp32 log-softmax), `trl` (TRL "
             "1.16's trainers' fused chunked head, `trl.kernels.ChunkedLogProbFunction`, as on CUDA), `fastkto` "
             "(its Triton path's workspace). `extrapolated`: B = 1, 2 and 8 simulated at 4 and 6 layers, every B at "
             "the model's depth predicted from their event logs (each allocation is affine in B, the depth L and B L;"
             " checked against full-depth steps in `tests/test_scale.py` and below); `interpolated`: two "
             "micro-batches simulated at full depth (`--depths full`), the others from their event logs; "
             "`simulated`: that step itself. GB = 1e9 bytes.", "",
             "| model | GPUs | head | 80 GB | 141 GB | command |", "|---|---|---|---|---|---|"]

    def cell(c, card):
        tokens = c["largest_tokens_per_gpu"][card]
        if not tokens:
            return "none"
        top = max(p["tokens_per_gpu"] for p in c["points"])
        b = tokens // seq
        return (">= " if tokens == top and c["points"][-1]["peak_gb"] * GB + overhead * GB <= CARDS[card] else "") + \
            f"{tokens} ({b} x {seq})"

    for (model, world), cs in by_model.items():
        for c in cs:
            layers = c["setup"]["layers"] or model_config(model).num_hidden_layers
            lines.append(f"| {model} ({c['params'] / 1e9:.1f} B, {layers} layers) | {world} | "
                         f"{c['setup']['head']} | {cell(c, '80GB')} | {cell(c, '141GB')} | `{curve_command(c)}` |")
    lines += ["", "Peaks per GPU (before the overhead) at powers of two and at each card's limit (the last fitting "
              "micro-batch and the next one):", "",
              "| model | head | B x T | tokens per GPU | peak | how | phase of the peak | params | grads | optimizer "
              "| FSDP buffers | activations | loss head |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, _world), cs in by_model.items():
        for c in cs:
            show = {1, 2, 4, 8, 16, 32, 64}
            for card in CARDS:
                b = c["largest_tokens_per_gpu"][card] // seq
                show |= {b, b + 1}
            show |= {p["batch"] for p in c["points"] if p["simulated"]}
            for p in c["points"]:
                if p["batch"] not in show:
                    continue
                b = p["breakdown_gb"]
                lines.append(f"| {model} | {c['setup']['head']} | {p['batch']} x {p['seq']} | {p['tokens_per_gpu']} | "
                             f"{p['peak_gb']:.1f} | {p.get('how', 'simulated')} | "
                             f"{p['peak_phase']} | {b['parameters']:.1f} | {b['gradients']:.1f} | "
                             f"{b['optimizer state'] + b['optimizer temporaries']:.1f} | {b['FSDP buffers']:.1f} | "
                             f"{b['activations']:.1f} | {b['loss head']:.1f} |")
    checks = [(c, k) for cs in by_model.values() for c in cs for k in c.get("checks", [])]
    if checks:
        lines += ["", "Interpolation checked against steps simulated directly at other sizes (`--verify HEAD:B`):",
                  "", "| model | head | B | simulated | predicted | phase |", "|---|---|---|---|---|---|"]
        for c, k in checks:
            lines.append(f"| {c['setup']['model']} | {c['setup']['head']} | {k['batch']} | {k['simulated_gb']:.3f} GB "
                         f"| {k['predicted_gb']:.3f} GB | {k['simulated_phase']} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "curve.md").write_text(table)
    _plot(by_model, overhead, out_dir / "curve.png")
    return table


def _plot(by_model: dict, overhead: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_model), figsize=(4.2 * len(by_model), 3.9), squeeze=False)
    for ax, ((model, world), cs) in zip(axes[0], by_model.items()):
        for c in cs:
            pts = c["points"]
            line, = ax.plot([p["tokens_per_gpu"] / 1024 for p in pts], [p["peak_gb"] + overhead for p in pts],
                            label=c["setup"]["head"], lw=1.4, ls="--" if c["setup"]["head"] == "trl" else "-")
            sim = [p for p in pts if p["simulated"]]
            ax.plot([p["tokens_per_gpu"] / 1024 for p in sim], [p["peak_gb"] + overhead for p in sim], "o",
                    color=line.get_color(), ms=4)
        for card, cap in CARDS.items():
            ax.axhline(cap / GB, color="grey", lw=0.8, ls="--")
            ax.text(2, cap / GB + 2, card, fontsize=7, color="grey")
        ax.set_xlim(0, 1.05 * max(p["tokens_per_gpu"] for c in cs for p in c["points"]) / 1024)
        ax.set_title(f"{model}, {world} GPUs", fontsize=9)
        ax.set_xlabel("K tokens per GPU per micro-batch")
        ax.set_ylim(0, 200)
    axes[0][0].set_ylabel(f"peak per GPU + {overhead:g} GB (GB)")
    axes[0][0].legend(fontsize=8, title="dots: simulated at full depth", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt_result(r: Result) -> str:
    s = r.setup
    lines = [f"{s['model']} ({r.params / 1e9:.1f} B parameters, {s['layers']} layers), W={s['world']}, "
             f"{s['loss'].upper()}, head={s['head']}" + (f" ({s['impl']} path)" if s["head"] == "fastkto" else "")
             + f", micro-batch {s['batch']} x {s['seq']}, checkpointing {'on' if s['checkpointing'] else 'off'}, "
               f"reference {s['ref']}",
             f"peak per GPU: {r.peak_bytes / GB:.2f} GB during {r.peak_phase}  (simulated in {r.seconds:.1f} s: "
             + ", ".join(f"{k} {v:.1f}" for k, v in r.phase_seconds.items()) + ")"]
    for k, v in r.breakdown.items():
        lines.append(f"  {k:<16} {v / GB:8.2f} GB")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-32b", choices=MODELS + ("tiny-llama",))
    p.add_argument("--world", type=int, default=8, help="FSDP2 ranks (a fake process group)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per micro-batch")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--head", default="fastkto", help="naive, trl (TRL 1.16's fused head), trl-logits (TRL's "
                                                     "selective_log_softmax on the logits), fastkto, or a list")
    p.add_argument("--impl", default="triton", choices=("triton", "torch"), help="fastkto's path (workspace plan)")
    p.add_argument("--loss", default="kto", choices=("kto", "dpo"))
    p.add_argument("--ref", default="precomputed", choices=("precomputed", "held"))
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--optimizer", default="fused", choices=("fused", "foreach", "for-loop"),
                   help="AdamW implementation (foreach, CUDA's default, holds a copy of a moment while it runs)")
    p.add_argument("--layers", type=int, default=None, help="override the depth (quick runs)")
    p.add_argument("--curve", action="store_true",
                   help="largest tokens per GPU that fit the 80 / 141 GB cards: micro-batches of B x 4096 tokens, "
                        "B = 1..--max-batch, at the model's depth extrapolated from B = 1 and --curve-sizes "
                        "simulated at --depths; --batch and --seq ignored")
    p.add_argument("--curve-sizes", default="2,8", help="the two micro-batches above 1 simulated per head (--curve)")
    p.add_argument("--depths", default="4,6", help="the two depths simulated (--curve), or 'full': simulate the "
                                                   "model's depth at --curve-sizes and interpolate between")
    p.add_argument("--max-batch", type=int, default=CURVE_MAX_BATCH, help="largest micro-batch of the curve")
    p.add_argument("--verify", default="", help="HEAD:B,... micro-batches also simulated directly (--curve)")
    p.add_argument("--overhead", type=float, default=DEFAULT_OVERHEAD_GB, help="GB added to the peak for the cards")
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", nargs="+", metavar="CURVE_JSON",
                   help="write curve.md and curve.png from --curve --json outputs into --out and exit")
    p.add_argument("--out", default="benchmarks/results/scale", help="folder for --report")
    args = p.parse_args(argv)
    if args.report:
        from pathlib import Path

        print(report([c for f in args.report for c in json.loads(Path(f).read_text())], args.out))
        return 0
    heads = args.head.split(",")
    base = dict(model=args.model, world=args.world, batch=args.batch, seq=args.seq, impl=args.impl, loss=args.loss,
                ref=args.ref, checkpointing=not args.no_checkpointing, optimizer=args.optimizer, layers=args.layers)
    out = []
    if args.curve:
        sizes = tuple(int(b) for b in args.curve_sizes.split(","))
        verify = [(h, int(b)) for h, b in (v.split(":") for v in args.verify.split(",") if v)]
        depths = None if args.depths == "full" else tuple(int(d) for d in args.depths.split(","))
        out = curve(Setup(**base, head=heads[0]), args.overhead * GB, heads=heads, sizes=sizes,
                    max_batch=args.max_batch, depths=depths, verify=verify,
                    log=lambda r: print(f"  {r.setup['head']:8} {r.setup['tokens_per_gpu']:6} tokens per GPU: "
                                        f"{r.peak_bytes / GB:7.2f} GB ({r.peak_phase}, {r.seconds:.0f} s)",
                                        file=sys.stderr, flush=True))
        if not args.json:
            for c in out:
                print(f"{args.model} {c['setup']['head']:8} " + ", ".join(
                    f"{card}: {tokens} tokens per GPU" for card, tokens in c["largest_tokens_per_gpu"].items()))
                for k in c["checks"]:
                    print(f"  check at B={k['batch']}: simulated {k['simulated_gb']:.3f} GB, predicted "
                          f"{k['predicted_gb']:.3f} GB")
    else:
        for head in heads:
            r = run_step(Setup(**base, head=head))
            out.append(r.as_dict())
            if not args.json:
                print(_fmt_result(r))
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
