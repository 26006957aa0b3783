"""The peers, each behind a small adapter, and why one is skipped where it cannot run.

* TRL (>= 1.16) ``trl.kernels.ChunkedLogProbFunction``: the chunked log-prob head TRL's own trainers use
  (``trl.trainer.utils.add_fused_lm_head``): cuBLAS / BLAS projections on (4096 tokens x 32768 vocabulary) tiles,
  folded into online log-sum-exp statistics, recomputed in the backward. Called as TRL's trainer calls it (vocab
  chunk 32768, no optional outputs), on the scored rows only: ``hidden[mask]``. (TRL's trainer compacts only on
  Triton devices and scores every position on the CPU; compacting here gives TRL its best case everywhere.)
* Liger-Kernel ``LigerFusedLinearKTOLoss`` / ``LigerFusedLinearDPOLoss``: whole-loss modules that walk the batch
  a few sequences at a time (``chunk_size=1`` by default), materialize that chunk's (T x V) logits and take the
  gradients inside the forward with ``torch.func``; compiled with ``torch.compile`` (their default, also on the
  CPU, where it needs a C++ compiler). They take z0 as an input and do not score KL pairs, so the Liger KTO step
  scores them with Liger's own chunked forward (``chunk_forward``), one chunk at a time under no_grad.
* Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none")``: per-token cross-entropy (= -log p) without
  the logits, CUDA only, with its default gradient filtering (``filter_eps="auto"``).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

__all__ = ["skip_reason", "trl_logprobs", "cce_logprobs", "liger_logprobs", "masked_sequence_logps",
           "liger_kto_loss", "liger_dpo_loss", "TRL_VOCAB_CHUNK"]

TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
LIGER_COMPILED = True  # Liger's default; the harness tests switch it off (compiling takes ~20 s on 2 cores)


def _missing(module: str, install: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip, printed as is
        return f"{module} not importable ({type(exc).__name__}: {exc}); install with: {install}"
    return None


def skip_reason(method: str, device: torch.device) -> str | None:
    """Why ``method`` cannot run on ``device`` here (missing package, needs CUDA), or None when it can."""
    if method in ("naive", "fastkto-torch", "fastkto"):
        return None
    if method in ("fastkto-triton", "fastkto-cublas"):
        if device.type != "cuda":
            return "needs CUDA (on the CPU Triton runs only in its interpreter, for tests; far too slow to time)"
        return _missing("triton", "pip install triton")
    if method == "trl":
        reason = _missing("trl.kernels", "pip install 'trl>=1.16'")
        if reason is None and not hasattr(importlib.import_module("trl.kernels"), "ChunkedLogProbFunction"):
            reason = "this trl has no trl.kernels.ChunkedLogProbFunction (added in TRL 1.16)"
        return reason
    if method == "liger":
        return _missing("liger_kernel.chunked_loss", "pip install liger-kernel")
    if method == "cce":
        if device.type != "cuda":
            return "Cut Cross-Entropy runs only on CUDA (its kernels are Triton GPU kernels)"
        return _missing("cut_cross_entropy", "pip install cut-cross-entropy")
    raise ValueError(f"unknown method {method!r}")


def trl_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap=None) -> torch.Tensor:
    """TRL's chunked head: (N, D), (V, D), (N,) all valid -> (N,) float32 log-probs, differentiable."""
    from trl.kernels import ChunkedLogProbFunction

    # (hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)
    logps, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, TRL_VOCAB_CHUNK, softcap, 1.0, ())
    return logps


def cce_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap=None,
                 ignore_index: int = -100) -> torch.Tensor:
    """Cut Cross-Entropy: (..., D), (V, D), (...) -> (...) float32 log-probs (0 where ignored), differentiable."""
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index,
                                reduction="none")
    return -loss.float()


def liger_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap=None) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy per token (``reduction="none"``, which takes a per-token upstream
    gradient): (N, D), (V, D), (N,) -> (N,) float32 log-probs = -cross-entropy, differentiable. CUDA only."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=softcap)(weight, hidden, labels)
    return -loss.float()


def masked_sequence_logps(per_token_fn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          softcap=None, ignore_index: int = -100) -> torch.Tensor:
    """(B, T, D), (V, D), (B, T) -> (B,) sums of a (N, D) -> (N,) per-token head over the scored positions only."""
    mask = labels != ignore_index
    per_token = per_token_fn(hidden[mask], weight, labels[mask], softcap=softcap)
    return hidden.new_zeros(mask.shape, dtype=per_token.dtype).masked_scatter(mask, per_token).sum(-1)


def _liger_chunk_logps(hidden, weight, labels, ignore_index=-100):
    """Liger's own per-sequence log-probs (its ``chunk_forward``), one sequence chunk at a time, no gradient."""
    from liger_kernel.chunked_loss.fused_linear_unpaired_preference import LigerFusedLinearUnpairedPreferenceBase

    out = []
    with torch.no_grad():
        for h, y in zip(hidden.split(1), labels.split(1)):  # chunk_size=1, Liger's default
            pref = torch.ones(1, dtype=torch.bool, device=h.device)
            logps, *_ = LigerFusedLinearUnpairedPreferenceBase.chunk_forward(h, weight, y, pref,
                                                                             ignore_index=ignore_index)
            out.append(logps)
    return torch.cat(out)


def liger_kto_loss(policy_hidden, weight, labels, desirable, *, ref_hidden, ref_weight, kl_hidden, kl_ref_hidden,
                   kl_labels, beta=0.1) -> torch.Tensor:
    """KTO step with Liger: z0 from the KL pairs (Liger's chunked forward), then ``LigerFusedLinearKTOLoss``."""
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    policy_kl = _liger_chunk_logps(kl_hidden, weight.detach(), kl_labels)
    ref_kl = _liger_chunk_logps(kl_ref_hidden, ref_weight, kl_labels)
    z0 = (policy_kl - ref_kl).mean().clamp(min=0)
    loss_fn = LigerFusedLinearKTOLoss(beta=beta, use_ref_model=True, compiled=LIGER_COMPILED)
    out = loss_fn(policy_hidden, weight, labels, None, desirable, ref_hidden, ref_weight, None, z0)
    return out[0] if isinstance(out, tuple) else out


def liger_dpo_loss(policy_hidden, weight, labels, *, ref_hidden, ref_weight, beta=0.1) -> torch.Tensor:
    """DPO (sigmoid) step with Liger: rows [0, B/2) chosen, [B/2, B) rejected, summed log-probs."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=True, average_log_prob=False, compiled=LIGER_COMPILED)
    out = loss_fn(weight, policy_hidden, labels, None, ref_hidden, ref_weight, None)
    return out[0] if isinstance(out, tuple) else out
