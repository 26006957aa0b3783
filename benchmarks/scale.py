"""A full KTO / DPO training step of a real transformers model, simulated on fake tensors: peak memory per GPU.

    python -m benchmarks.scale --model qwen2.5-32b --world 8 --batch 4 --seq 2048 --head fastkto
    python -m benchmarks.scale --model llama-3.1-70b --world 16 --batch 2 --seq 4096 --head naive --json
    python -m benchmarks.scale --model qwen2.5-32b --curve        # largest tokens per GPU on 80 / 141 GB cards

No GPU and no memory are needed: the model is built from its published hyper-parameters (no hub access) on
``FakeTensorMode``, sharded with FSDP2 over a fake process group of ``--world`` ranks (rank 0 is simulated; the
others hold the same shapes), and one training step runs as the ``docs/scale-out.md`` recipe runs it:

    policy forward (grad)  ->  KL pass (no grad)  [-> reference passes, --ref held]  ->  loss  ->  backward
    ->  AdamW step (foreach, as on CUDA)  ->  zero_grad

fp32 master weights, bf16 compute (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), ``fully_shard``
per decoder layer, then the backbone, the untied head and the root; activation checkpointing (non-reentrant) unless
``--no-checkpointing``; the reference precomputed (log-probs in the batch) or held (a frozen bf16 FSDP2 copy).

Heads (``--head``):
  naive    the gathered bf16 head weight (kept by autograd until backward, as FSDP keeps a head in its root
           unit), bf16 logits, their fp32 copy (soft-capped for Gemma-2), log_softmax, gather.
  trl      bf16 logits from the gathered head, log-probs by TRL's own ``selective_log_softmax`` (the row loop it
           runs where its Triton kernel does not: on CUDA TRL >= 1.x may use a fused kernel over the same logits).
  fastkto  ``KTOLoss`` / ``DPOLoss`` on the sharded head (a DTensor, cast to bf16 per shard: fastkto gathers it
           per call and frees it). The tile workspace of the path that would run (``--impl triton``: the CUDA
           kernels' split buffers and their backward plan; ``torch``: the PyTorch tiles) is accounted explicitly:
           the fake paths report the bytes the real call holds beyond its outputs (``fastkto.ops.on_fake_transient``,
           computed with the real planning functions) and the tracker adds them at that moment.

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
DEBUG = False
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
        fully_shard(model.model, mesh=mesh, mp_policy=mp)
        if not cfg.tie_word_embeddings:
            fully_shard(model.lm_head, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device="cpu")
    return model


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
        if self.current > self.peak:
            self.peak, self.peak_event, self.peak_phase = self.current, len(self.events) - 1, self._phase()

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
        live: dict[int, int] = {}
        for key, delta in self.events[: self.peak_event + 1]:
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


def _naive_logps(hidden, weight, labels, softcap, how):
    """Sequence log-prob sums of (B, T, D) hidden through a gathered (V, D) bf16 head the way trainers do."""
    from fastkto import reference

    # bf16 (B, T, V): outputs.logits, which a trainer holds (here: this local) while it computes the loss
    logits = hidden @ weight.T
    if how == "trl":
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
    """One build of ``s``'s model, then one tracked step per (batch, seq) of ``sizes`` (in order; each a steady-state
    step: the optimizer state exists). ``stop(result)`` ends the sweep early when it returns True."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastkto import ops

    if s.head not in ("naive", "trl", "fastkto"):
        raise ValueError(f"head must be naive, trl or fastkto, got {s.head!r}")
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
    results = []
    with fake_world(s.world) as mesh, mode, target:
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
        for i, (b, t) in enumerate(sizes):
            size = Setup(**{**s.__dict__, "batch": b, "seq": t})
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
    live = tracker.live_at_peak()
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for key, nbytes in live.items():
        _, tag, _ = tracker.info[key]
        if key in grads:
            cat = "gradients"
        elif tag in ("parameters", "optimizer state", "activations"):
            cat = tag
        else:
            cat = {"head": "loss head", "fsdp": "FSDP buffers", "optimizer": "optimizer temporaries"}.get(
                tag, "activations")
            if DEBUG and cat == "activations":
                print("  live", nbytes / GB, tag, tracker.info[key][2], file=sys.stderr)
        breakdown[cat] += nbytes
    setup = dict(s.__dict__)
    setup["layers"] = cfg.num_hidden_layers
    setup["tokens_per_gpu"] = s.batch * s.seq
    phases = {k: v for k, v in tracker.phase_seconds.items() if k != "setup"}
    return Result(setup, n_params, tracker.peak, tracker.peak_phase, breakdown, time.perf_counter() - t0,
                  tracker.start_bytes, phases)


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
CURVE_SEQ = 4096
CURVE_BATCHES = (1, 2, 4, 8, 16)


def curve(base: Setup, overhead: float, batches=CURVE_BATCHES, seq: int = CURVE_SEQ, log=None) -> dict:
    """Peaks at micro-batches of ``batches`` x ``seq`` tokens per GPU (one build, the sweep stops at the first size
    over the largest card), and for each card of ``CARDS`` the largest tokens per GPU whose peak plus
    ``overhead`` bytes fits (0: none of the sizes)."""
    largest = max(CARDS.values())
    results = run_steps(base, [(b, seq) for b in batches], stop=lambda r: r.peak_bytes + overhead > largest)
    points = []
    for r in results:
        points.append({"tokens_per_gpu": r.setup["tokens_per_gpu"], "batch": r.setup["batch"], "seq": seq,
                       "peak_gb": r.peak_bytes / GB, "peak_phase": r.peak_phase,
                       "breakdown_gb": {k: v / GB for k, v in r.breakdown.items()}, "seconds": round(r.seconds, 1)})
        if log:
            log(r)
    fits = {card: max([p["tokens_per_gpu"] for p in points if p["peak_gb"] * GB + overhead <= cap], default=0)
            for card, cap in CARDS.items()}
    return {"setup": {**base.__dict__, "seq": seq, "layers": results[0].setup["layers"]},
            "params": results[0].params, "overhead_gb": overhead / GB, "points": points,
            "largest_tokens_per_gpu": fits}


def report(curves: list[dict], out_dir) -> str:
    """Writes ``curve.md`` (the largest tokens per GPU per model, head and card, and every simulated point) and
    ``curve.png`` (peak per GPU against tokens per GPU, one panel per model) under ``out_dir``; returns the table."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_model: dict = {}
    for c in curves:
        by_model.setdefault((c["setup"]["model"], c["setup"]["world"]), []).append(c)
    overhead = curves[0]["overhead_gb"]
    lines = [f"Largest micro-batch (tokens per GPU, B x {curves[0]['setup']['seq']}) whose simulated peak + "
             f"{overhead:g} GB overhead fits the card; FSDP2, bf16 compute, fp32 master weights and AdamW "
             "(fused), activation checkpointing, KTO with the KL pass, reference log-probs precomputed. "
             "`python -m benchmarks.scale --model M --world W --head fastkto,naive --curve` "
             "(TRL's head: `--head trl`; not in this table).", "",
             "| model | GPUs | head | 80 GB | 141 GB |", "|---|---|---|---|---|"]
    for (model, world), cs in by_model.items():
        for c in cs:
            f = c["largest_tokens_per_gpu"]
            top = max(p["tokens_per_gpu"] for p in c["points"])

            def cell(card):
                # the largest size of the sweep fitting: the limit lies beyond it
                return f">= {f[card]}" if f[card] == top else (str(f[card]) if f[card] else "none")

            layers = c["setup"]["layers"] or model_config(model).num_hidden_layers
            lines.append(f"| {model} ({c['params'] / 1e9:.1f} B, {layers} layers) | {world} | "
                         f"{c['setup']['head']} | {cell('80GB')} | {cell('141GB')} |")
    lines += ["", "Every simulated point (GB = 1e9 bytes per GPU, before the overhead):", "",
              "| model | head | tokens per GPU | peak | phase of the peak | params | grads | optimizer | FSDP buffers "
              "| activations | loss head |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, _world), cs in by_model.items():
        for c in cs:
            for p in c["points"]:
                b = p["breakdown_gb"]
                lines.append(f"| {model} | {c['setup']['head']} | {p['tokens_per_gpu']} | {p['peak_gb']:.1f} | "
                             f"{p['peak_phase']} | {b['parameters']:.1f} | {b['gradients']:.1f} | "
                             f"{b['optimizer state'] + b['optimizer temporaries']:.1f} | {b['FSDP buffers']:.1f} | "
                             f"{b['activations']:.1f} | {b['loss head']:.1f} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "curve.md").write_text(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_model), figsize=(4.2 * len(by_model), 3.8), squeeze=False)
    for ax, ((model, world), cs) in zip(axes[0], by_model.items()):
        for c in cs:
            xs = [p["tokens_per_gpu"] for p in c["points"]]
            ax.plot(xs, [p["peak_gb"] + overhead for p in c["points"]], marker="o", label=c["setup"]["head"])
        for card, cap in CARDS.items():
            ax.axhline(cap / GB, color="grey", lw=0.8, ls="--")
            ax.text(xs[0] if xs else 4096, cap / GB + 2, card, fontsize=7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}, {world} GPUs", fontsize=9)
        ax.set_xlabel("tokens per GPU per micro-batch")
        ax.set_ylim(0, 200)
    axes[0][0].set_ylabel(f"peak per GPU + {overhead:g} GB (GB)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=110)
    return table


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
    p.add_argument("--head", default="fastkto", help="naive, trl, fastkto, or a comma-separated list")
    p.add_argument("--impl", default="triton", choices=("triton", "torch"), help="fastkto's path (workspace plan)")
    p.add_argument("--loss", default="kto", choices=("kto", "dpo"))
    p.add_argument("--ref", default="precomputed", choices=("precomputed", "held"))
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--optimizer", default="fused", choices=("fused", "foreach", "for-loop"),
                   help="AdamW implementation (foreach, CUDA's default, holds a copy of a moment while it runs)")
    p.add_argument("--layers", type=int, default=None, help="override the depth (quick runs)")
    p.add_argument("--curve", action="store_true", help="largest tokens per GPU that fit the 80 / 141 GB cards "
                                                        "(micro-batches 1..16 x 4096; --batch and --seq ignored)")
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
        for head in heads:
            c = curve(Setup(**{**base, "head": head}), args.overhead * GB,
                      log=lambda r: print(f"  {r.setup['head']:8} {r.setup['tokens_per_gpu']:6} tokens per GPU: "
                                          f"{r.peak_bytes / GB:7.2f} GB ({r.peak_phase}, {r.seconds:.0f} s)",
                                          file=sys.stderr))
            out.append(c)
            if not args.json:
                print(f"{args.model} {head:8} " + ", ".join(
                    f"{card}: {tokens} tokens per GPU" for card, tokens in c["largest_tokens_per_gpu"].items()))
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
