"""Guarding the one shift: an entry point that takes ``input_ids`` and does it, and a check for labels that skip it.

fastkto scores ``labels[t]`` from ``hidden[t]``; a causal LM's ``hidden[t]`` predicts token t + 1. Passing
``input_ids`` (or Hugging Face style labels, which the model shifts internally) as ``labels`` scores every token
from its own hidden state: a wrong loss with nothing to show for it. Two guards:

* ``completion_logps(hidden, weight, input_ids, completion_mask)`` takes what the model read and the completion
  mask (TRL's collators return both; so do fastkto's) and shifts once, inside: there are no labels to get wrong.
* ``looks_unshifted(labels)`` is the evidence a shifted label can never show: every sequence scored at its last
  position. A shifted label there would be the token after the sequence, which does not exist, so
  ``shift_labels`` and the collators always leave it ``ignore_index``; ``input_ids`` scores it in every row.
  ``KTOLoss`` / ``DPOLoss`` warn on it (see ``warn_if_unshifted``).
"""

from __future__ import annotations

import warnings

import torch

from .data import shift_labels
from .logprob import sequence_logps

__all__ = ["completion_logps", "looks_unshifted", "unshifted_fact", "warn_if_unshifted", "warn_unshifted",
           "UnshiftedLabelsWarning"]


class UnshiftedLabelsWarning(UserWarning):
    """Labels whose every sequence is scored at its last position: very likely ``input_ids`` or HF-style labels
    passed where fastkto's shifted labels belong."""


def looks_unshifted(labels: torch.Tensor, *, ignore_index: int = -100,
                    lengths: torch.Tensor | None = None) -> bool:
    """True when every sequence of ``labels`` scores its last position, which shifted labels never do.

    Args:
        labels: (B, T) padded (the last position is column T - 1), or with ``lengths`` (T_total,) / (1, T_total)
            packed (the last position of each sequence is its last token).
        ignore_index: the label of unscored positions.
        lengths: (S,) int lengths of the packed sequences (``torch.diff(cu_seqlens)``), or None for padded labels.
            Empty sequences are left out.

    Returns:
        A Python bool (one device-to-host copy when ``labels`` is not on the CPU). An empty batch gives False.
        Right-padded HF-style labels, which score only the longest rows' last column, are not caught: pass
        ``input_ids`` and the completion mask to ``completion_logps`` / ``shift_labels`` instead of building labels.
    """
    last_scored = unshifted_fact(labels, ignore_index=ignore_index, lengths=lengths)
    return bool(last_scored)


def unshifted_fact(labels: torch.Tensor, *, ignore_index: int = -100,
                   lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``looks_unshifted`` as a 0-d bool tensor on labels' device, read nowhere (no host sync): the losses read it
    with their other value checks."""
    if labels.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=labels.device)
    if lengths is None:
        return (labels.reshape(-1, labels.shape[-1])[:, -1] != ignore_index).all()
    lengths = lengths.to(device=labels.device, dtype=torch.long)
    # clamped: a layout that overruns the tokens is reported by its own check, not by an indexing error here
    ends = (torch.cumsum(lengths, 0) - 1).clamp(0, labels.numel() - 1)
    last = labels.reshape(-1).index_select(0, ends)
    # empty sequences have no last position: left out (counted as scored), but some sequence must be non-empty
    return ((last != ignore_index) | (lengths == 0)).all() & (lengths > 0).any()


def warn_if_unshifted(labels: torch.Tensor, name: str, *, ignore_index: int = -100,
                      lengths: torch.Tensor | None = None) -> None:
    """Warn (``UnshiftedLabelsWarning``) when ``looks_unshifted(labels)``: a message naming ``name`` and the fix.

    A warning, not an error: a batch whose hidden states were cut by hand (``hidden[:, :-1]`` with
    ``input_ids[:, 1:]``) and that has no padding also scores every last position, correctly.
    """
    if looks_unshifted(labels, ignore_index=ignore_index, lengths=lengths):
        warn_unshifted(name, packed=lengths is not None, stacklevel=4)


def warn_unshifted(name: str, *, packed: bool, stacklevel: int = 3) -> None:
    """The ``UnshiftedLabelsWarning`` for labels named ``name`` (packed: "its last token")."""
    where = "its last token" if packed else "the last position (column T - 1)"
    warnings.warn(
        f"{name}: every sequence is scored at {where}, which shifted labels never are (that position predicts the "
        f"token after the sequence): {name} look like input_ids or Hugging Face style labels, and every token would be "
        f"scored from its own hidden state. Build them with fastkto.shift_labels(input_ids, completion_mask) (the "
        f"collators do), or call fastkto.completion_logps(hidden, weight, input_ids, completion_mask). If the "
        f"hidden states were cut by hand (hidden[:, :-1] against input_ids[:, 1:]), these labels are right: pass "
        f"the uncut hidden states and shift_labels' labels to silence this",
        UnshiftedLabelsWarning,
        stacklevel=stacklevel,
    )


def completion_logps(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                     completion_mask: torch.Tensor, *, average: bool = False, ignore_index: int = -100,
                     **options) -> torch.Tensor:
    """Per-sequence log-probabilities of the completion tokens, from the hidden states of the tokens read.

    ``sequence_logps(hidden, weight, shift_labels(input_ids, completion_mask))``: the shift happens here, once,
    so a caller never builds labels. Completion token t + 1 is scored from ``hidden[:, t]``.

    Args:
        hidden: (B, T, D) float32 / bfloat16 / float16: the backbone's final hidden states for ``input_ids``,
            uncut (no ``[:, :-1]``).
        weight: (V, D): the LM-head weight.
        input_ids: (B, T) integer: the tokens the model read.
        completion_mask: (B, T) bool or 0/1: 1 on the completion tokens to score, 0 on prompt and padding.
        average: False: sums over the completion tokens; True: means.
        ignore_index: the label ``shift_labels`` gives unscored positions (any value outside [0, V)).
        options: ``sequence_logps``'s keyword options (bias, temperature, softcap, backend, workspace_bytes,
            process_group).

    Returns:
        (B,) float32, differentiable with respect to hidden, weight and bias.
    """
    for name, t in (("hidden", hidden), ("input_ids", input_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
        cut = (hidden.dim() == 3 and hidden.shape[0] == input_ids.shape[0]
               and hidden.shape[1] == input_ids.shape[1] - 1)
        hint = (": hidden is one position shorter, cut by hand (hidden[:, :-1]); pass the uncut hidden states, the "
                "shift happens here") if cut else ""
        raise ValueError(f"hidden must have shape input_ids.shape + (D,) = {tuple(input_ids.shape)} + (D,), got "
                         f"{tuple(hidden.shape)}{hint}")
    labels = shift_labels(input_ids, completion_mask, ignore_index=ignore_index)
    return sequence_logps(hidden, weight, labels, average=average, ignore_index=ignore_index, **options)
