"""The workloads: LM-head shapes, token sweeps per machine, inputs, and one forward + backward per method.

A workload point is built by ``build_point(spec, size)`` and returns a ``Point``: ``run()`` does one full
forward + backward (leaving the gradients in the leaves' ``.grad``), ``check()`` the same on a small batch
compared with the float64 naive result. Every method of a workload sees the same inputs (same seed).

primitive  per-token log-probs of N tokens, all scored, with a random upstream gradient: hidden (N, D) and
           weight (V, D) receive gradients. Methods: naive, fastkto-torch, fastkto-triton, trl, cce.
kto        a whole KTO step on the SmolLM2-135M head: policy forward + backward, reference forward, and the KL
           pairs under the policy and the reference (z0); B rows of T positions. Methods: naive (+ fastkto.loss's
           math), fastkto-torch / fastkto-triton (``fastkto.loss.KTOLoss``), trl / cce (their head + the same
           math), liger (``LigerFusedLinearKTOLoss``).
dpo        a whole DPO (sigmoid) step: policy forward + backward over chosen and rejected rows, reference forward.
masking    "none": every position scored; "real": the prompt / completion / padding proportions of real
           hh-rlhf batches (``benchmarks.realdata``).
e2e        (``benchmarks.e2e``) a KTO / DPO step of SmolLM2-135M-Instruct, backbone included, on real hh-rlhf rows,
           padded or packed; "batch" examples per batch ("kto": rows, each with its KL pair; "dpo": pairs), rows of
           at most "max_row" tokens, "batches" different batches (the job's sizes are the batch indices).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastkto.labels import UnshiftedLabelsWarning

from . import peers
from .naive import max_abs_diff_against_reference, naive_logprobs, naive_sequence_logps

# masking="none" scores every position, the last one included, on purpose (the cost of a fully scored batch):
# not the unshifted labels the losses warn about
warnings.filterwarnings("ignore", category=UnshiftedLabelsWarning)

__all__ = ["HeadShape", "SHAPES", "PROFILES", "METHODS", "Point", "build_point", "run_check", "profile_for", "shape_of"]


@dataclass(frozen=True)
class HeadShape:
    name: str
    hidden: int
    vocab: int
    softcap: float | None = None


SHAPES = {
    "smollm2-135m": HeadShape("SmolLM2-135M", 576, 49152),
    "llama3-8b": HeadShape("Llama-3-8B", 4096, 128256),
    "qwen2.5-32b": HeadShape("Qwen2.5-32B", 5120, 152064),
    "gemma2-2b": HeadShape("Gemma-2-2B", 2304, 256000, softcap=30.0),
}

METHODS = {
    "primitive": ("naive", "fastkto-torch", "fastkto-triton", "trl", "cce"),
    "kto": ("naive", "fastkto-torch", "fastkto-triton", "trl", "liger", "cce"),
    "dpo": ("naive", "fastkto-torch", "fastkto-triton", "trl", "liger", "cce"),
    "e2e": ("naive", "fastkto"),
}

# Token sweeps: each size doubles the tokens, so the naive logits (and its peak) grow 1x, 2x, 4x. CPU: 2 cores
# at ~50-100 GFLOP/s fp32, each point a few seconds; the large heads get few tokens there (at 8-32 tokens their
# passes are bound by reading the weight and writing its gradient). CUDA: naive peaks of a few GB.
# timing: per workload, untimed warm-up passes and timed repeats (the median is reported) per size;
# warmup_each_size: warm up before every size (True), only before the first (False), or only for these methods
# (Liger recompiles for a new shape). "quick" only checks that everything runs: no warm-up, one pass.
PROFILES = {
    "cpu": {
        "dtype": "float32",
        "timing": {"primitive": {"warmup": 1, "repeats": 2, "warmup_each_size": False},
                   "steps": {"warmup": 1, "repeats": 3, "warmup_each_size": ["liger"]},
                   "e2e": {"warmup": 1, "repeats": 2, "warmup_each_size": True}},
        "primitive": {"smollm2-135m": [256, 512, 1024], "llama3-8b": [8, 16, 32], "qwen2.5-32b": [8, 16, 32],
                      "gemma2-2b": [8, 16, 32]},
        "steps": {"shape": "smollm2-135m", "batch": 4, "T": [64, 128, 256]},
        "check": {"primitive_tokens": 4, "primitive_vocab_rows": 16384, "batch": 4, "T": 16},
        # packed.py's batches (issue 14's targets); one per job, as a padded KTO step takes 20-50 s here
        "e2e": {"losses": ["kto", "dpo"], "batch": {"kto": 8, "dpo": 4}, "max_row": 512, "batches": 1},
    },
    "quick": {
        "dtype": "float32",
        "timing": {w: {"warmup": 0, "repeats": 1, "warmup_each_size": False} for w in ("primitive", "steps", "e2e")},
        "primitive": {"smollm2-135m": [32, 64, 128], "gemma2-2b": [2, 4]},
        "steps": {"shape": "smollm2-135m", "batch": 4, "T": [16, 32, 64]},
        "check": {"primitive_tokens": 4, "primitive_vocab_rows": 16384, "batch": 4, "T": 8},
        "e2e": {"losses": ["kto", "dpo"], "batch": {"kto": 2, "dpo": 2}, "max_row": 64, "batches": 1},
    },
    "cuda": {
        # sizes so that the naive peak (~12 bytes per logit) is ~1.5, 3 and 6 GB
        "dtype": "bfloat16",
        "timing": {"primitive": {"warmup": 2, "repeats": 5, "warmup_each_size": True},
                   "steps": {"warmup": 2, "repeats": 5, "warmup_each_size": True},
                   "e2e": {"warmup": 2, "repeats": 5, "warmup_each_size": True}},
        "skip": {"kto": ["fastkto-torch"], "dpo": ["fastkto-torch"]},  # the Triton path is the GPU's; saves time
        "primitive": {"smollm2-135m": [2048, 4096, 8192], "llama3-8b": [1024, 2048, 4096],
                      "qwen2.5-32b": [1024, 2048, 4096], "gemma2-2b": [512, 1024, 2048]},
        "steps": {"shape": "llama3-8b", "batch": 8, "T": [128, 256, 512]},
        "check": {"primitive_tokens": 256, "batch": 4, "T": 64},
        "e2e": {"losses": ["kto", "dpo"], "batch": {"kto": 16, "dpo": 8}, "max_row": 1024, "batches": 2},
    },
}


def shape_of(spec: dict) -> HeadShape:
    """The spec's head: a name from ``SHAPES``, or a dict of HeadShape's fields (tests use tiny heads)."""
    shape = spec["shape"]
    return HeadShape(**shape) if isinstance(shape, dict) else SHAPES[shape]


def profile_for(device: torch.device, quick: bool) -> dict:
    """The default sweep for this machine: "quick" (tiny, any device), "cuda" or "cpu"."""
    if quick:
        return PROFILES["quick"]
    return PROFILES["cuda" if device.type == "cuda" else "cpu"]


@dataclass
class Point:
    """One workload point for one method: ``run()`` is the timed forward + backward."""

    run: Callable[[], None]
    leaves: list[torch.Tensor]  # tensors whose .grad every method must produce (and hold)
    tokens: int  # positions in the batch (B * T, or N)
    scored: int  # positions with a label
    info: dict


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(shape, std, gen, dtype, device, requires_grad=False):
    # drawn on the CPU in float32 so that every device and dtype sees the same numbers
    t = torch.empty(shape).normal_(0.0, std, generator=gen).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


_WEIGHT_BLOCK = 8192


def make_weight(shape: HeadShape, dtype, device, seed: int) -> torch.Tensor:
    """(V, D) LM-head weight, std 1 / sqrt(D) (logits of std ~2 with ``hidden`` below), requires grad.

    Rows repeat every 8192: drawing a billion normal numbers takes longer than a measurement, and repeated rows
    change neither the work nor the memory of any method (the softmax still runs over all V columns)."""
    block = _normal((min(shape.vocab, _WEIGHT_BLOCK), shape.hidden), shape.hidden ** -0.5, _gen(seed), dtype, device)
    weight = torch.empty(shape.vocab, shape.hidden, dtype=dtype, device=device)
    for v0 in range(0, shape.vocab, block.shape[0]):
        weight[v0:v0 + block.shape[0]] = block[:shape.vocab - v0]
    return weight.requires_grad_(True)


# ------------------------------------------------------------------------------------------------ primitive

def _primitive_fn(method: str, softcap):
    """(N, D), (V, D), (N,) -> (N,) float32 per-token log-probs for one method."""
    import fastkto

    if method == "naive":
        return lambda h, w, y: naive_logprobs(h, w, y, softcap=softcap)
    if method.startswith("fastkto-"):
        backend = method.split("-", 1)[1]
        return lambda h, w, y: fastkto.fused_logprobs(h, w, y, softcap=softcap, backend=backend)
    if method == "trl":
        return lambda h, w, y: peers.trl_logprobs(h, w, y, softcap=softcap)
    if method == "cce":
        return lambda h, w, y: peers.cce_logprobs(h, w, y, softcap=softcap)
    raise ValueError(f"method {method!r} has no primitive workload")


def primitive_inputs(shape: HeadShape, n_tokens: int, weight: torch.Tensor, seed: int):
    """hidden (N, D) requiring grad, labels (N,) all scored, upstream gradient (N,) float32."""
    gen = _gen(seed + n_tokens)
    hidden = _normal((n_tokens, shape.hidden), 2.0, gen, weight.dtype, weight.device, True)
    labels = torch.randint(0, shape.vocab, (n_tokens,), generator=gen).to(weight.device)
    grad_out = torch.randn(n_tokens, generator=gen).to(weight.device)
    return hidden, labels, grad_out


def primitive_point(method: str, shape: HeadShape, n_tokens: int, weight: torch.Tensor, seed: int) -> Point:
    fn = _primitive_fn(method, shape.softcap)
    hidden, labels, grad_out = primitive_inputs(shape, n_tokens, weight, seed)

    def run():
        fn(hidden, weight, labels).backward(grad_out)

    return Point(run, [hidden, weight], n_tokens, n_tokens, {"N": n_tokens, "D": shape.hidden, "V": shape.vocab})


def primitive_check(method: str, shape: HeadShape, n_tokens: int, weight: torch.Tensor, seed: int,
                    vocab_rows: int | None = None) -> dict:
    """Max |method - float64 reference| of the log-probs and both gradients on ``n_tokens`` fresh tokens.

    ``vocab_rows``: check on the head's first rows only (the float64 reference walks the whole weight twice:
    about 40 s for Qwen2.5-32B's on one CPU core); recorded as "vocab" in the result."""
    if vocab_rows is not None and vocab_rows < shape.vocab:
        shape = HeadShape(shape.name, shape.hidden, vocab_rows, shape.softcap)
        weight = weight.detach()[:vocab_rows].clone().requires_grad_(True)
    hidden, labels, grad_out = primitive_inputs(shape, n_tokens, weight, seed + 1)
    weight.grad = None
    value = _primitive_fn(method, shape.softcap)(hidden, weight, labels)
    value.backward(grad_out)
    diffs = max_abs_diff_against_reference(hidden.detach(), weight.detach(), labels, grad_out, value.detach(),
                                           hidden.grad, weight.grad, softcap=shape.softcap)
    weight.grad = None
    return {**diffs, "tokens": n_tokens, "vocab": shape.vocab}


# ------------------------------------------------------------------------------------------------ steps

@dataclass
class StepInputs:
    policy_hidden: torch.Tensor  # (B, T, D), requires grad
    weight: torch.Tensor  # (V, D), requires grad
    labels: torch.Tensor  # (B, T)
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor  # the reference model's own head (frozen)
    desirable: torch.Tensor  # (B,) bool, KTO only
    kl_hidden: torch.Tensor | None = None
    kl_ref_hidden: torch.Tensor | None = None
    kl_labels: torch.Tensor | None = None


def step_inputs(kind: str, shape: HeadShape, batch: int, T: int, masking: str, weight: torch.Tensor,
                ref_weight: torch.Tensor, seed: int, split: dict | None) -> tuple[StepInputs, dict]:
    """Random hidden states and labels for a KTO / DPO batch; with masking "real", the hh-rlhf proportions."""
    from .realdata import batch_layout, labels_from_layout

    gen = _gen(seed + batch * T)
    dev, dt = weight.device, weight.dtype
    paired = kind == "dpo"
    if masking == "real":
        layout = batch_layout(split, batch, T, paired=paired, seed=seed)
        labels = labels_from_layout(layout.prompt, layout.completion, T, shape.vocab, generator=gen)
        kl_labels = labels_from_layout(layout.kl_prompt, layout.kl_completion, T, shape.vocab, generator=gen)
        info = {"scored_fraction": layout.scored_fraction, "real_batch_scored_fraction": layout.real_fraction}
    elif masking == "none":
        labels = torch.randint(0, shape.vocab, (batch, T), generator=gen)
        kl_labels = torch.randint(0, shape.vocab, (batch, T), generator=gen)
        info = {"scored_fraction": 1.0}
    else:
        raise ValueError(f"masking must be 'none' or 'real', got {masking!r}")
    policy = _normal((batch, T, shape.hidden), 2.0, gen, dt, dev, True)
    # the reference model's hidden states: close to the policy's, as after a few steps of training
    ref = (policy.detach() + _normal((batch, T, shape.hidden), 0.2, gen, dt, dev)).detach()
    desirable = (torch.arange(batch) % 2 == 0).to(dev)
    inputs = StepInputs(policy, weight, labels.to(dev), ref, ref_weight, desirable)
    if kind == "kto":
        inputs.kl_hidden = _normal((batch, T, shape.hidden), 2.0, gen, dt, dev)
        inputs.kl_ref_hidden = (inputs.kl_hidden + _normal((batch, T, shape.hidden), 0.2, gen, dt, dev)).detach()
        inputs.kl_labels = kl_labels.to(dev)
    return inputs, info


def _head_seq_logps(method: str, softcap):
    """(B, T, D), (V, D), (B, T) -> (B,) summed log-probs of the scored positions, for the per-token methods."""
    if method == "naive":
        return lambda h, w, y: naive_sequence_logps(h, w, y, softcap=softcap)
    if method == "trl":
        return lambda h, w, y: peers.masked_sequence_logps(peers.trl_logprobs, h, w, y, softcap=softcap)
    if method == "cce":  # CCE skips ignore_index positions itself
        return lambda h, w, y: peers.cce_logprobs(h, w, y, softcap=softcap).sum(-1)
    raise ValueError(method)


def step_loss(kind: str, method: str, x: StepInputs, softcap=None, beta: float = 0.1) -> torch.Tensor:
    """The scalar loss of one KTO / DPO step by ``method`` (its forward pass; the caller runs backward)."""
    from fastkto.loss import DPOLoss, KTOLoss, dpo_loss, kto_kl, kto_loss

    if method.startswith("fastkto"):
        backend = method.split("-", 1)[1] if "-" in method else "auto"
        if kind == "kto":
            return KTOLoss(beta, softcap=softcap, backend=backend)(
                x.policy_hidden, x.weight, x.labels, x.desirable, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight,
                kl_hidden=x.kl_hidden, kl_labels=x.kl_labels, kl_ref_hidden=x.kl_ref_hidden).loss
        return DPOLoss(beta, softcap=softcap, backend=backend)(
            x.policy_hidden, x.weight, x.labels, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight).loss
    if method == "liger":
        if kind == "kto":
            return peers.liger_kto_loss(x.policy_hidden, x.weight, x.labels, x.desirable, ref_hidden=x.ref_hidden,
                                        ref_weight=x.ref_weight, kl_hidden=x.kl_hidden,
                                        kl_ref_hidden=x.kl_ref_hidden, kl_labels=x.kl_labels, beta=beta)
        return peers.liger_dpo_loss(x.policy_hidden, x.weight, x.labels, ref_hidden=x.ref_hidden,
                                    ref_weight=x.ref_weight, beta=beta)
    seq = _head_seq_logps(method, softcap)
    policy = seq(x.policy_hidden, x.weight, x.labels)
    with torch.no_grad():
        ref = seq(x.ref_hidden, x.ref_weight, x.labels)
        if kind == "kto":
            z0 = kto_kl(seq(x.kl_hidden, x.weight.detach(), x.kl_labels), seq(x.kl_ref_hidden, x.ref_weight,
                                                                              x.kl_labels))
    if kind == "kto":
        return kto_loss(policy, ref, x.desirable, kl=z0, beta=beta).loss
    half = policy.shape[0] // 2
    return dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta=beta).loss


def _float64_reference(kind: str, x: StepInputs, beta: float = 0.1):
    """The naive step on float64 copies: (loss, grad of policy hidden, grad of weight)."""
    from fastkto.loss import dpo_loss, kto_kl, kto_loss

    def f64(t, grad=False):
        return None if t is None else t.detach().double().requires_grad_(grad)

    ph, w = f64(x.policy_hidden, True), f64(x.weight, True)
    rw = f64(x.ref_weight)

    def seq(h, weight, y):
        return naive_sequence_logps(h, weight, y, upcast=torch.float64)

    policy = seq(ph, w, x.labels)
    with torch.no_grad():
        ref = seq(f64(x.ref_hidden), rw, x.labels)
        if kind == "kto":
            z0 = kto_kl(seq(f64(x.kl_hidden), w.detach(), x.kl_labels), seq(f64(x.kl_ref_hidden), rw, x.kl_labels))
    if kind == "kto":
        loss = kto_loss(policy, ref, x.desirable, kl=z0, beta=beta).loss
    else:
        half = policy.shape[0] // 2
        loss = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta=beta).loss
    loss.backward()
    return loss.detach(), ph.grad, w.grad


def step_point(kind: str, method: str, shape: HeadShape, batch: int, T: int, masking: str, weight, ref_weight,
               seed: int, split) -> Point:
    x, info = step_inputs(kind, shape, batch, T, masking, weight, ref_weight, seed, split)

    def run():
        step_loss(kind, method, x, softcap=shape.softcap).backward()

    scored = int((x.labels != -100).sum())
    info.update({"B": batch, "T": T, "D": shape.hidden, "V": shape.vocab})
    return Point(run, [x.policy_hidden, x.weight], batch * T, scored, info)


def step_check(kind: str, method: str, shape: HeadShape, batch: int, T: int, masking: str, weight, ref_weight,
               seed: int, split) -> dict:
    """Max |method - float64 naive| of the loss and of the gradients of the policy hidden states and the weight."""
    x, _ = step_inputs(kind, shape, batch, T, masking, weight, ref_weight, seed + 1, split)
    weight.grad = None
    loss = step_loss(kind, method, x, softcap=shape.softcap)
    loss.backward()
    ref_loss, ref_dh, ref_dw = _float64_reference(kind, x)
    diffs = {
        "value": abs(loss.item() - ref_loss.item()), "value_scale": abs(ref_loss.item()),
        "grad_hidden": (x.policy_hidden.grad.double() - ref_dh).abs().max().item(),
        "grad_hidden_scale": ref_dh.abs().max().item(),
        "grad_weight": (weight.grad.double() - ref_dw).abs().max().item(),
        "grad_weight_scale": ref_dw.abs().max().item(),
        "batch": batch, "T": T,
    }
    weight.grad = None
    return diffs


# ------------------------------------------------------------------------------------------------ dispatch

def build_point(spec: dict, size, state: dict) -> Point:
    """The point of ``spec`` (a worker's job) at ``size``: tokens (primitive) or T (steps).

    ``state`` holds what the sizes share (the weights, the data split), created on first use.
    """
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    shape = shape_of(spec)
    if "weight" not in state:
        state["weight"] = make_weight(shape, dtype, device, spec["seed"])
    if spec["workload"] == "primitive":
        return primitive_point(spec["method"], shape, size, state["weight"], spec["seed"])
    _step_state(spec, shape, state)
    return step_point(spec["workload"], spec["method"], shape, spec["batch"], size, spec["masking"],
                      state["weight"], state["ref_weight"], spec["seed"], state["split"])


def _step_state(spec, shape, state):
    if "ref_weight" not in state:
        w = state["weight"]
        noise = _normal(tuple(w.shape), 0.1 * shape.hidden ** -0.5, _gen(spec["seed"] + 7), w.dtype, w.device)
        state["ref_weight"] = (w.detach() + noise).detach()
        del noise
    if "split" not in state:
        from .realdata import token_split

        state["split"] = token_split() if spec["masking"] == "real" else None


def run_check(spec: dict, state: dict) -> dict:
    """The accuracy check of ``spec``'s method on its small check size."""
    shape = shape_of(spec)
    check = spec["check"]
    if spec["workload"] == "primitive":
        return primitive_check(spec["method"], shape, check["primitive_tokens"], state["weight"], spec["seed"],
                               check.get("primitive_vocab_rows"))
    _step_state(spec, shape, state)
    return step_check(spec["workload"], spec["method"], shape, check["batch"], check["T"], spec["masking"],
                      state["weight"], state["ref_weight"], spec["seed"], state["split"])
