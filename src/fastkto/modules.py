"""The loss modules: ``KTOLoss`` and ``DPOLoss`` from final hidden states and the LM-head weight.

The second layer of the losses (``fastkto.loss`` is the first: the math on ``(B,)`` log-probabilities). A module
checks the batch's layout (padded ``(B, T, D)`` or packed with ``cu_seqlens``) and every pass's head, reads every
value check of the call with one host sync (``ValueChecks``), then obtains each log-probability (policy,
reference, KTO's KL pairs) through ``sequence_logps``, so no (tokens x vocabulary) logits are built, and hands them
to ``kto_loss`` / ``dpo_loss``. The policy pass carries gradients; the reference and the KL pairs run under
``torch.no_grad()`` and save nothing for backward. Gradients flow through ordinary autograd: ``loss.backward()``
is all a training loop (or DDP's gradient hooks) needs.

A new loss family from hidden states (one that needs no reference model, say) subclasses ``_PreferenceLoss``, which
holds the ``sequence_logps`` options, the per-pass value checks and the reference / reuse logic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import labels as _labels
from . import packing
from ._checks import check_bool, check_choice, check_int, check_positive, shape_of
from .distributed import is_sharded
from .logprob import BACKENDS, _check_inputs, _sequence_logps, check_sequence_values
from .loss import (
    DPO_LOSSES,
    KTO_LOSSES,
    DPOOutput,
    KTOOutput,
    _check_desirable,
    _check_dpo_hyper,
    _check_kto_hyper,
    _check_logps,
    dpo_loss,
    kto_kl,
    kto_loss,
)
from .value_checks import ValueChecks, host_reads_allowed

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["KTOLoss", "DPOLoss"]


def _same_tensor(a, b) -> bool:
    """True when a and b are the same values for certain: one object, or views of the same memory with the same
    layout (e.g. ``weight`` and ``weight.detach()``). None matches only None."""
    if a is None or b is None:
        return a is None and b is None
    if a is b:
        return True
    if not host_reads_allowed(a, b):
        return False  # no data pointers while Dynamo traces or under fake tensors: compute the pass
    return (
        a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )




@dataclass
class _Batch:
    """The layout of one set of sequences: n of them, padded (cu_seqlens None) or packed."""

    n: int
    cu_seqlens: torch.Tensor | None = None
    lengths: torch.Tensor | None = None  # (n,) int64, packed only
    cu_name: str = "cu_seqlens"
    checked: object = None  # what logprob.check_sequence_values returned, once the values are read
    total: int = 0  # packed tokens, packed only


def _check_batch(hidden, labels, cu_seqlens, hidden_name="policy_hidden", labels_name="labels",
                 cu_name="cu_seqlens") -> _Batch:
    """Check the shapes of hidden states and labels against their layout: padded (B, T, D) and (B, T), or packed
    (T_total, D) / (1, T_total, D) and hidden's leading shape with ``cu_seqlens``."""
    if cu_seqlens is None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            hint = f" (a packed batch also needs {cu_name})" if isinstance(hidden, torch.Tensor) else ""
            raise ValueError(f"{hidden_name} must be a (B, T, D) tensor, got {shape_of(hidden)}{hint}")
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"{labels_name} must have {hidden_name}'s (B, T) = {tuple(hidden.shape[:2])}, got "
                             f"{shape_of(labels)}")
        return _Batch(hidden.shape[0])
    if not isinstance(hidden, torch.Tensor) or not (hidden.dim() == 2 or (hidden.dim() == 3 and hidden.shape[0] == 1)):
        raise ValueError(f"{hidden_name} of a packed batch ({cu_name} given) must be a (T_total, D) or "
                         f"(1, T_total, D) tensor, got {shape_of(hidden)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{labels_name} must have {hidden_name}'s leading shape {tuple(hidden.shape[:-1])} (one label "
                         f"per packed token), got {shape_of(labels)}")
    lengths = packing.cu_seqlens_lengths(cu_seqlens, labels.shape[-1], device=labels.device, name=cu_name,
                                         tokens_name=labels_name)  # its values: checked with the labels'
    return _Batch(lengths.shape[0], cu_seqlens, lengths, cu_name, total=labels.shape[-1])


@contextlib.contextmanager
def _layout_errors_first(batch: _Batch):
    """A packed layout's values are read with the other value checks, after the shape checks; but a wrong layout
    makes the other shapes disagree too (a desirable of B labels against B - 1 sequences). On that error path only,
    the layout's values are checked first, so that the error names the cause."""
    try:
        yield
    except (TypeError, ValueError):
        if batch.cu_seqlens is not None and host_reads_allowed(batch.cu_seqlens):
            packing.check_cu_seqlens(batch.cu_seqlens, batch.total, name=batch.cu_name)
        raise


def _aliases_trained(ref, trained) -> bool:
    """True when ``ref`` is a view of the memory of ``trained``, a tensor that requires grad (its optimizer updates
    that memory in place). Not read while Dynamo traces (no data pointers there): the eager calls check it."""
    if not (isinstance(ref, torch.Tensor) and isinstance(trained, torch.Tensor) and trained.requires_grad
            and ref.device == trained.device and host_reads_allowed(ref, trained)):
        return False
    ptr = _storage_pointer(ref)
    return ptr is not None and ptr == _storage_pointer(trained)


def _storage_pointer(t: Tensor) -> int | None:
    """The address of the memory under ``t``: a DTensor's local shard's (FSDP2, tensor parallel); None for a
    wrapper subclass that has no memory of its own."""
    if is_sharded(t):
        with torch.no_grad():
            t = t.to_local()
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # "invalid python storage": a wrapper subclass
        return None


def _reference_head(prefix, weight, bias, ref_weight, ref_bias):
    """The (weight, bias) that score the reference pass named by ``prefix`` ("ref" or "kl_ref").

    Defaults to the policy's head, detached, only while that head is frozen (LoRA, a frozen or shared head): a
    trainable one (``weight.requires_grad``: untied, or tied to a trained embedding) would score the reference with
    the current head, not the reference model's, and every reward would drift with the head. So ``ref_weight`` is
    required then, and ``ref_bias`` when the bias is trainable.
    """
    how = (f"pass ref_weight=ref_model.get_output_embeddings().weight (the reference model's own LM head; for a "
           f"reference that starts as the policy, a frozen copy taken before training: weight.detach().clone()), or "
           f"{prefix}_logps instead of {prefix}_hidden")
    if ref_weight is None:
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            raise ValueError(
                f"ref_weight is required: weight requires grad (a trainable LM head, untied or tied to a trained "
                f"embedding), so the default reference head, the policy's head detached, would score {prefix}_hidden "
                f"with the head being trained instead of the reference's; {how}. A frozen head "
                f"(weight.requires_grad False, as with LoRA) needs no ref_weight"
            )
        ref_weight = weight.detach() if isinstance(weight, torch.Tensor) else weight
    elif _aliases_trained(ref_weight, weight):
        raise ValueError(
            f"ref_weight shares memory with weight, which requires grad: the reference head would change with every "
            f"optimizer step of the policy's (e.g. ref_weight=weight.detach()); {how}"
        )
    elif isinstance(ref_weight, torch.Tensor) and isinstance(weight, torch.Tensor) and ref_weight.dim() == 2 \
            and weight.dim() == 2 and ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight has vocabulary size {ref_weight.shape[0]} but weight has {weight.shape[0]} (shapes "
            f"{tuple(ref_weight.shape)} and {tuple(weight.shape)}, (V, D)): the reference must score the same "
            f"vocabulary (a reference with a resized or different tokenizer cannot be compared token by token)"
        )
    if _aliases_trained(ref_bias, bias):
        raise ValueError("ref_bias shares memory with bias, which requires grad: the reference bias would change with "
                         "every optimizer step; pass the reference model's LM-head bias or a frozen copy taken before "
                         "training (bias.detach().clone())")
    if ref_bias is None and isinstance(bias, torch.Tensor):
        if bias.requires_grad:
            raise ValueError(
                "ref_bias is required: bias requires grad (a trainable LM-head bias), so the default, the policy's "
                "bias detached, would score the reference with the bias being trained; pass ref_bias=the reference "
                "model's LM-head bias (or a frozen copy taken before training: bias.detach().clone())"
            )
        ref_bias = bias.detach()
    return ref_weight, ref_bias


def _check_head_pass(hidden_name, hidden, weight_name, weight, bias_name, bias) -> None:
    """Check the hidden states and head of one pass with the names the caller used (``ref_hidden``, ``kl_hidden``,
    ``ref_weight``, ...), before ``sequence_logps`` would report them as plain "hidden" / "weight"."""
    for name, t in ((hidden_name, hidden), (weight_name, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or hidden.dim() < 1:
        return  # sequence_logps names these shapes
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        if hidden.shape[-1] == vocab and vocab < dim:  # a vocabulary is larger than a hidden size
            raise ValueError(
                f"{weight_name} has shape {tuple(weight.shape)}, which looks transposed: it must be (V, D), one row "
                f"per vocabulary entry (the LM head's nn.Linear weight as it is, not .T), with D = "
                f"{hidden_name}'s last dimension ({hidden.shape[-1]})"
            )
        if hidden.shape[-1] == vocab:
            raise ValueError(
                f"{hidden_name}'s last dimension is {vocab}, {weight_name}'s vocabulary size, not its hidden size "
                f"D={dim}: these look like logits (the LM head's output). Pass the final hidden states, the "
                f"backbone's output before the LM head (fastkto.integrations.transformers.hidden_states(model, "
                f"input_ids), or model.model(...).last_hidden_state)"
            )
        raise ValueError(
            f"hidden size mismatch: {hidden_name} has D={hidden.shape[-1]} but {weight_name} has shape "
            f"{tuple(weight.shape)} (V, D)"
        )
    if (hidden.dtype != weight.dtype and hidden.dtype.is_floating_point and weight.dtype.is_floating_point
            and not (hidden.device.type != "meta" and torch.is_autocast_enabled(hidden.device.type))):
        raise TypeError(
            f"{hidden_name} and {weight_name} must share a dtype, got {hidden.dtype} and {weight.dtype}: run the call "
            f"under torch.autocast, or cast one of them, e.g. {hidden_name}.to({weight.dtype})"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{bias_name} must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"{bias_name} must have shape (V,) = ({vocab},) like {weight_name}'s rows, got "
                             f"{tuple(bias.shape)}")


class _PreferenceLoss(torch.nn.Module):
    """The base of KTOLoss and DPOLoss: the ``sequence_logps`` options, the value checks of a pass, and the reference
    / reuse logic. A subclass's ``forward`` checks its batch, registers each pass with ``_check_values``, runs the
    checks once, then calls ``_logps`` (the policy, with gradient) and ``_reference``."""

    def __init__(self, ignore_index, temperature, softcap, backend, average_log_prob, workspace_bytes):
        super().__init__()
        check_int("ignore_index", ignore_index)
        check_positive("temperature", temperature)
        if softcap is not None:
            check_positive("softcap", softcap)
        check_choice("backend", backend, BACKENDS)
        if average_log_prob is not None:
            check_bool("average_log_prob", average_log_prob)
        if workspace_bytes is not None:
            check_positive("workspace_bytes", workspace_bytes)
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.backend, self.average_log_prob, self.workspace_bytes = backend, average_log_prob, workspace_bytes

    def _average(self) -> bool:
        return bool(self.average_log_prob)

    def _check_values(self, checks: ValueChecks, hidden, weight, bias, labels, label_name, batch: _Batch) -> None:
        """Registers the value checks of one layout's passes with ``checks`` (run once for the whole call): the packed
        layout, that every row scores at least one token (an all-ignored row, T = 0 or an empty packed sequence has
        log-prob 0, which would add a constant with zero gradient to the loss and count in its means as if it were a
        real sequence), and the labels' range and scored count. The pass's arguments are checked first (shapes and
        dtypes: a transposed weight is named as such, not by the labels it makes look out of range)."""
        _check_inputs(hidden, weight, labels, bias, self.ignore_index, self.temperature, self.softcap)

        def scored_rows(lengths):
            scored = labels != self.ignore_index
            if lengths is None:
                empty = ~scored.any(dim=-1)
                what = f"{label_name} rows"
            else:  # counts from a running sum: no host read, and no failure before a bad layout is reported
                running = torch.nn.functional.pad(scored.reshape(-1).long().cumsum(0), (1, 0))
                bounds = batch.cu_seqlens.long().clamp(0, labels.shape[-1])
                empty = (running[bounds[1:]] - running[bounds[:-1]]) <= 0
                what = f"packed sequences of {label_name} (as {batch.cu_name} splits it)"
            n_empty = empty.sum()
            hint = "drop those sequences from the batch (a truncated completion, an empty answer)"

            def read(values):
                if values and values[0]:
                    rows = empty.nonzero().flatten().tolist()
                    shown = f"{rows[:10]}{' ...' if len(rows) > 10 else ''}"
                    raise ValueError(
                        f"{what} {shown} have no scored token (every label is ignore_index={self.ignore_index}, or "
                        f"the sequence is empty); {hint}"
                    )

            checks.add((n_empty,), n_empty == 0, f"{what} have no scored token: {hint}", read)

        batch.checked = check_sequence_values(checks, labels, batch.cu_seqlens, self.ignore_index, weight.shape[0],
                                              name=label_name, cu_name=batch.cu_name, after_layout=scored_rows)
        # fastkto.labels: every sequence scored at its last position, which shifted labels never are (a warning: a
        # batch cut by hand, hidden[:, :-1] against input_ids[:, 1:], without padding, looks the same)
        unshifted = _labels.unshifted_fact(labels, ignore_index=self.ignore_index, lengths=batch.lengths)

        def warn(values):
            if values and values[0]:
                _labels.warn_unshifted(label_name, packed=batch.lengths is not None, stacklevel=5)

        checks.add((unshifted,), None, "", warn)

    def _logps(self, hidden, weight, labels, bias, batch: _Batch):
        return _sequence_logps(
            hidden, weight, labels, cu_seqlens=batch.cu_seqlens, average=self._average(), bias=bias,
            ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap, backend=self.backend,
            workspace_bytes=self.workspace_bytes, checked=batch.checked,
        )

    def _reference(self, prefix, hidden, weight, bias, labels, batch, policy_logps, ref_hidden, ref_weight, ref_bias,
                   ref_logps):
        """The reference's (B,) log-probs of ``labels``: given, reused, or one no-grad pass over ref_hidden.

        ``prefix`` names the arguments in errors ("ref" or "kl_ref"). ``batch`` is the layout of ``hidden`` and
        ``labels`` (the reference scores the same sequences, so ref_hidden shares it). ``policy_logps`` is the
        policy's result for the same labels (None if it was not computed), reused when the reference is the same
        computation.
        """
        hidden_name = "policy_hidden" if prefix == "ref" else "kl_hidden"
        n = batch.n
        if ref_logps is not None:
            if ref_hidden is not None:
                raise ValueError(f"pass {prefix}_logps or {prefix}_hidden, not both")
            return _check_logps(f"{prefix}_logps", ref_logps, n, (hidden_name, hidden)).detach()
        if ref_hidden is None:
            raise ValueError(
                f"the reference is missing: pass {prefix}_logps ({n},) (precomputed) or {prefix}_hidden "
                f"(the reference model's final hidden states, shaped like {hidden_name})"
            )
        # the policy's own head by default (frozen): known the same without comparing data pointers, which a
        # compiled call cannot read
        same_head = ref_weight is None and ref_bias is None
        ref_weight, ref_bias = _reference_head(prefix, weight, bias, ref_weight, ref_bias)
        if isinstance(ref_hidden, torch.Tensor):
            _check_head_pass(f"{prefix}_hidden", ref_hidden, "ref_weight", ref_weight, "ref_bias", ref_bias)
        if not isinstance(ref_hidden, torch.Tensor) or tuple(ref_hidden.shape) != tuple(hidden.shape):
            shape = tuple(ref_hidden.shape) if isinstance(ref_hidden, torch.Tensor) else type(ref_hidden).__name__
            raise ValueError(
                f"{prefix}_hidden must have {hidden_name}'s shape {tuple(hidden.shape)} (the same sequences under the "
                f"reference model), got {shape}"
            )
        if policy_logps is not None and _same_tensor(ref_hidden, hidden) and (
                same_head or (_same_tensor(ref_weight, weight) and _same_tensor(ref_bias, bias))):
            return policy_logps.detach()  # the same computation: reuse it, no second pass
        with torch.no_grad():
            return self._logps(ref_hidden, ref_weight, labels, ref_bias, batch)

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, softcap={self.softcap}, "
            f"backend={self.backend!r}, average_log_prob={self.average_log_prob}"
        )


class KTOLoss(_PreferenceLoss):
    """KTO from final hidden states, never building the logits: ``kto_loss`` on ``sequence_logps`` outputs.

    Constructor: the ``kto_loss`` hyper-parameters (beta, desirable_weight, undesirable_weight, loss_type), and
    the ``sequence_logps`` options used for every pass: ignore_index (label of prompt / padding positions),
    temperature, softcap, backend (``fastkto.logprob.BACKENDS``), average_log_prob (False: sum over completion
    tokens, as TRL; True: the mean), workspace_bytes.

    Call: ``loss_fn(policy_hidden, weight, labels, desirable, *, ...) -> KTOOutput``

        policy_hidden  (B, T, D) float32 / bfloat16 / float16: the policy's final hidden states, with gradient.
        weight         (V, D): the policy's LM-head weight.  bias: (V,) or None.
        labels         (B, T) int: labels[b, t] is scored from policy_hidden[b, t] (already shifted), prompt and
                       padding positions = ignore_index.
        desirable      (B,) bool.
        reference      ref_logps (B,) precomputed, or ref_hidden (B, T, D) from the reference model scored with
                       ref_weight / ref_bias: the reference model's LM head, same vocabulary as weight. Required
                       when weight (bias) requires grad; a frozen head (LoRA, a frozen or shared head) may leave
                       them None for the policy's, detached. When ref_hidden is policy_hidden and the head is the
                       same, the policy's log-probs are reused.
        z0             kl (precomputed), or KL pairs: kl_hidden (B_kl, T_kl, D) and kl_labels under the policy, and
                       kl_ref_logps (B_kl,) or kl_ref_hidden under the reference; averaged over
                       kl_process_group's ranks when given (see ``kto_kl``). loss_type="kto" needs one of
                       them (``kl=0.0`` for z0 = 0, chosen explicitly); without either it raises ValueError.
        packed         cu_seqlens (B + 1,) int: policy_hidden is (T_total, D) or (1, T_total, D), labels its leading
                       shape, the B sequences concatenated (``fastkto.packing``; ``KTOCollator(packed=True)``);
                       ref_hidden shares that layout. kl_cu_seqlens does the same for kl_hidden / kl_labels (the
                       KL pairs' own layout). Results equal the padded layout's (see ``sequence_logps``).

    The reference and KL passes run under torch.no_grad() and save nothing for backward; only the policy pass is
    differentiable (gradients reach policy_hidden, weight and bias through ordinary autograd).
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 loss_type: str = "kto", *, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", average_log_prob: bool = False,
                 workspace_bytes: int | None = None):
        super().__init__(ignore_index, temperature, softcap, backend, average_log_prob, workspace_bytes)
        _check_kto_hyper(beta, desirable_weight, undesirable_weight, loss_type)
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def forward(self, policy_hidden: Tensor, weight: Tensor, labels: Tensor, desirable: Tensor, *,
                ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None, ref_logps: Tensor | None = None,
                kl_hidden: Tensor | None = None, kl_labels: Tensor | None = None, kl_ref_hidden: Tensor | None = None,
                kl_ref_logps: Tensor | None = None, kl: float | Tensor | None = None, bias: Tensor | None = None,
                ref_bias: Tensor | None = None, kl_process_group: ProcessGroup | None = None,
                cu_seqlens: Tensor | None = None, kl_cu_seqlens: Tensor | None = None) -> KTOOutput:
        batch = _check_batch(policy_hidden, labels, cu_seqlens)
        _check_head_pass("policy_hidden", policy_hidden, "weight", weight, "bias", bias)
        with _layout_errors_first(batch):
            _check_desirable(desirable, batch.n, policy_hidden.device, "policy_hidden")
            if batch.n == 0:
                raise ValueError("cu_seqlens holds no sequence: the batch must hold at least one")
            uses_kl = KTO_LOSSES[self.loss_type].uses_kl
            if kl is None and kl_hidden is None and uses_kl:
                raise ValueError(
                    f"loss_type={self.loss_type!r} needs its reference point z0: pass the KL pairs (kl_hidden, "
                    "kl_labels and kl_ref_hidden or kl_ref_logps; KTOCollator builds kl_input_ids / kl_labels), a "
                    "precomputed kl, or kl=0.0 to use z0 = 0 explicitly"
                )
            kl_inputs = {"kl_labels": kl_labels, "kl_ref_hidden": kl_ref_hidden, "kl_ref_logps": kl_ref_logps,
                         "kl_process_group": kl_process_group, "kl_cu_seqlens": kl_cu_seqlens}
            kl_batch = None
            if kl_hidden is None:
                given = [name for name, value in kl_inputs.items() if value is not None]
                if given:
                    raise ValueError(f"{', '.join(given)} given without kl_hidden (the KL pairs' hidden states)")
            else:
                if kl_labels is None:
                    raise ValueError("kl_hidden needs kl_labels: the (B_kl, T_kl) labels of the KL pairs")
                if kl is not None:
                    raise ValueError("pass kl (a precomputed z0) or the KL pairs (kl_hidden, ...), not both")
                if not uses_kl:
                    raise ValueError(f"loss_type={self.loss_type!r} uses no KL estimate; do not pass kl_hidden")
                # the KL pairs have their own layout: padded (B_kl, T_kl, D), or packed with kl_cu_seqlens
                kl_batch = _check_batch(kl_hidden, kl_labels, kl_cu_seqlens, "kl_hidden", "kl_labels", "kl_cu_seqlens")
                _check_head_pass("kl_hidden", kl_hidden, "weight", weight, "bias", bias)

        checks = ValueChecks(policy_hidden, labels)  # one host sync for every pass's value checks
        self._check_values(checks, policy_hidden, weight, bias, labels, "labels", batch)
        if kl_batch is not None:
            self._check_values(checks, kl_hidden, weight, bias, kl_labels, "kl_labels", kl_batch)
        checks.run()
        policy_logps = self._logps(policy_hidden, weight, labels, bias, batch)
        ref = self._reference("ref", policy_hidden, weight, bias, labels, batch, policy_logps, ref_hidden, ref_weight,
                              ref_bias, ref_logps)
        if kl_batch is not None:
            with torch.no_grad():
                kl_policy = self._logps(kl_hidden, weight, kl_labels, bias, kl_batch)
            kl_ref = self._reference("kl_ref", kl_hidden, weight, bias, kl_labels, kl_batch, kl_policy, kl_ref_hidden,
                                     ref_weight, ref_bias, kl_ref_logps)
            kl = kto_kl(kl_policy, kl_ref, process_group=kl_process_group)
        return kto_loss(policy_logps, ref, desirable, kl=kl, beta=self.beta, desirable_weight=self.desirable_weight,
                        undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
                f"undesirable_weight={self.undesirable_weight}, loss_type={self.loss_type!r}, " + super().extra_repr())


class DPOLoss(_PreferenceLoss):
    """DPO (and variants) from final hidden states, never building the logits: ``dpo_loss`` on ``sequence_logps``.

    Constructor: the ``dpo_loss`` hyper-parameters (beta, loss_type, label_smoothing, discopop_tau), the
    ``sequence_logps`` options (ignore_index, temperature, softcap, backend, workspace_bytes), average_log_prob
    (None: length-averaged log-probs for loss_type="ipo", as TRL does, sums otherwise; or force True / False),
    and reference_free (True: the reference log-probs are 0 and no reference is needed or accepted).

    Call: ``loss_fn(policy_hidden, weight, labels, *, ...) -> DPOOutput``. The batch holds 2P sequences: rows
    [0, P) the chosen completions, rows [P, 2P) the rejected ones, pair i = (row i, row P + i) (TRL's layout).
    Shapes and the reference arguments (ref_logps (2P,), or ref_hidden with ref_weight / ref_bias, which may
    default to the policy's head detached only when that head is frozen) are as in ``KTOLoss``. ``bco_delta``
    (bco_pair's reward shift) is a call argument because it changes every step. Packed batches: ``cu_seqlens``
    (2P + 1,) as in ``KTOLoss``, the P chosen sequences first, then the P rejected ones
    (``PairedCollator(packed=True)``).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
                 discopop_tau: float = 0.05, reference_free: bool = False, ignore_index: int = -100,
                 temperature: float = 1.0, softcap: float | None = None, backend: str = "auto",
                 average_log_prob: bool | None = None, workspace_bytes: int | None = None):
        super().__init__(ignore_index, temperature, softcap, backend, average_log_prob, workspace_bytes)
        _check_dpo_hyper(beta, loss_type, label_smoothing, discopop_tau)
        check_bool("reference_free", reference_free)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.discopop_tau, self.reference_free = discopop_tau, reference_free

    def _average(self) -> bool:
        if self.average_log_prob is None:
            return DPO_LOSSES[self.loss_type].averages_log_probs
        return self.average_log_prob

    def forward(self, policy_hidden: Tensor, weight: Tensor, labels: Tensor, *, ref_hidden: Tensor | None = None,
                ref_weight: Tensor | None = None, ref_logps: Tensor | None = None, bias: Tensor | None = None,
                ref_bias: Tensor | None = None, bco_delta: float | Tensor = 0.0,
                cu_seqlens: Tensor | None = None) -> DPOOutput:
        batch = _check_batch(policy_hidden, labels, cu_seqlens)
        _check_head_pass("policy_hidden", policy_hidden, "weight", weight, "bias", bias)
        with _layout_errors_first(batch):
            rows = batch.n
            if rows % 2:
                if batch.cu_seqlens is not None:
                    raise ValueError(f"DPOLoss needs an even number of packed sequences (the P chosen ones, then the P "
                                     f"rejected ones, pair i = sequences i and P + i), but cu_seqlens holds {rows}")
                raise ValueError(f"DPOLoss needs an even batch (chosen rows, then rejected rows), got B={rows}")
            if rows == 0:
                name = "policy_hidden" if batch.cu_seqlens is None else "cu_seqlens"
                raise ValueError(f"{name} is empty: the batch must hold at least one pair")
            if self.reference_free:
                given = [name for name, v in (("ref_hidden", ref_hidden), ("ref_logps", ref_logps),
                                               ("ref_weight", ref_weight), ("ref_bias", ref_bias)) if v is not None]
                if given:
                    raise ValueError(f"reference_free=True takes no reference, got {', '.join(given)}")
        checks = ValueChecks(policy_hidden, labels)  # one host sync for every pass's value checks
        self._check_values(checks, policy_hidden, weight, bias, labels, "labels", batch)
        checks.run()

        logps = self._logps(policy_hidden, weight, labels, bias, batch)
        if self.reference_free:
            ref = torch.zeros_like(logps).detach()
        else:
            ref = self._reference("ref", policy_hidden, weight, bias, labels, batch, logps, ref_hidden, ref_weight,
                                  ref_bias, ref_logps)
        pairs = rows // 2
        return dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=self.beta,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                        discopop_tau=self.discopop_tau, bco_delta=bco_delta)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"reference_free={self.reference_free}, " + super().extra_repr())
