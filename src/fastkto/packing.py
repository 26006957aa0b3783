"""The packed (padding-free) layout: several sequences concatenated along one token dimension.

Convention: flash-attention's ``cu_seqlens``, the cumulative sequence lengths. A packed batch of S sequences
with T_total tokens in all has ``cu_seqlens`` of shape (S + 1,), int32 or int64, with ``cu_seqlens[0] == 0``,
non-decreasing, ``cu_seqlens[-1] == T_total``; sequence i is tokens ``[cu_seqlens[i], cu_seqlens[i + 1])``.
transformers marks the same layout with ``position_ids`` that restart at 0 for each sequence
(``[0, 1, 2, 0, 1, 0, ...]``); ``cu_seqlens_from_position_ids`` / ``position_ids_from_cu_seqlens`` convert.

Everything here is layout bookkeeping on integer tensors, plus ``segment_sums``, the per-sequence reduction that
``fastkto.sequence_logps`` uses on packed tokens: it reduces a zero-padded (S, longest) matrix row by row, with
no atomic adds (deterministic on CUDA as on the CPU).
"""

from __future__ import annotations

import torch

from ._checks import check_integer_tensor, shape_of
from .value_checks import ValueChecks, host_reads_allowed

__all__ = [
    "check_cu_seqlens",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "position_ids_from_cu_seqlens",
    "segment_sums",
    "segment_counts",
    "pack_padded",
]

_INT_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(cu_seqlens, total: int, *, device: torch.device | None = None, name: str = "cu_seqlens",
                     allow_empty: bool = True, tokens_name: str = "labels") -> torch.Tensor:
    """Validate a packed layout and return its (S,) int64 sequence lengths (on cu_seqlens' device).

    Args:
        cu_seqlens: (S + 1,) int32 / int64 tensor: 0, then the running total of the sequence lengths.
        total: the number of packed tokens the layout must cover (``cu_seqlens[-1]``).
        device: the device it must be on (that of the tokens it describes), or None for any.
        name: the argument's name in error messages; ``tokens_name``: the tensor ``total`` was read off.
        allow_empty: False to refuse sequences of length 0.

    Raises:
        TypeError for a non-tensor or a non-integer dtype; ValueError for a wrong shape or device, a first entry
        other than 0, a decrease, a last entry other than ``total``, or (``allow_empty=False``) an empty sequence.
        One host sync (none while ``torch.compile`` traces: the value checks become device-side asserts).
    """
    checks = ValueChecks(cu_seqlens)
    lengths = cu_seqlens_lengths(cu_seqlens, total, device=device, name=name, tokens_name=tokens_name)
    check_cu_seqlens_values(checks, cu_seqlens, lengths, total, name=name, allow_empty=allow_empty,
                            tokens_name=tokens_name)
    checks.run()
    return lengths


def cu_seqlens_lengths(cu_seqlens, total: int, *, device: torch.device | None = None, name: str = "cu_seqlens",
                       tokens_name: str = "labels") -> torch.Tensor:
    """``check_cu_seqlens``'s checks of type, dtype, shape and device (no values read): the (S,) int64 lengths."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of cumulative sequence lengths, got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be int32 or int64 (flash-attention's cu_seqlens), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must have shape (S + 1,): 0, then the running total of the S sequence lengths; "
                         f"got {shape_of(cu_seqlens)}")
    if device is not None and cu_seqlens.device != torch.device(device):
        raise ValueError(f"{name} is on {cu_seqlens.device} but {tokens_name} is on {device}: move it there "
                         f"({name}.to({str(device)!r}))")
    return cu_seqlens[1:].long() - cu_seqlens[:-1].long()


def check_cu_seqlens_values(checks, cu_seqlens, lengths, total: int, *, name: str = "cu_seqlens",
                            allow_empty: bool = True, tokens_name: str = "labels") -> int:
    """Registers ``check_cu_seqlens``'s value checks with ``checks`` (a ``fastkto.value_checks.ValueChecks``) and
    returns their index there; their result is the longest sequence's length (an int, 0 for no sequence), or None
    where nothing was read."""
    first, last = cu_seqlens[0].long(), cu_seqlens[-1].long()
    n_decreasing, n_empty = (lengths < 0).sum(), (lengths == 0).sum()
    longest = lengths.max() if lengths.numel() else first * 0

    def read(values):
        if values is None:
            return None
        first_v, last_v, decreasing, empty, longest_v = values
        if first_v != 0:
            raise ValueError(f"{name} must start at 0, got {name}[0] = {first_v}")
        if decreasing:
            at = int((lengths < 0).nonzero()[0, 0])
            raise ValueError(f"{name} must be non-decreasing, but {name}[{at + 1}] = {int(cu_seqlens[at + 1])} < "
                             f"{name}[{at}] = {int(cu_seqlens[at])}")
        if last_v != total:
            raise ValueError(f"{name} must end at the number of packed tokens, {total} ({tokens_name}'s length), "
                             f"got {name}[-1] = {last_v}")
        if empty and not allow_empty:
            rows = (lengths == 0).nonzero().flatten().tolist()
            raise ValueError(f"{name} holds empty sequences (length 0) at {rows[:10]}"
                             f"{' ...' if len(rows) > 10 else ''}")
        return longest_v

    ok = (first == 0) & (n_decreasing == 0) & (last == total)
    if not allow_empty:
        ok = ok & (n_empty == 0)
    return checks.add((first, last, n_decreasing, n_empty, longest), ok,
               f"{name} must start at 0, be non-decreasing and end at {total} ({tokens_name}'s length)"
               + ("" if allow_empty else ", with no empty sequence"), read)


def cu_seqlens_from_lengths(lengths, *, device: torch.device | str | None = None,
                            dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """(S + 1,) cu_seqlens of sequences of the given lengths (a list of ints or an integer tensor), in ``dtype``
    (int32, flash-attention's, or int64). An empty list gives ``[0]``; a total that ``dtype`` cannot hold raises."""
    if dtype not in _INT_DTYPES:
        raise TypeError(f"dtype must be torch.int32 or torch.int64 (cu_seqlens are offsets), got {dtype}")
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.numel() == 0 and lengths.dim() == 1:
        lengths = lengths.long()  # torch.as_tensor([]) is float32: no sequence is still a layout
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-d sequence of ints, got {shape_of(lengths)} {lengths.dtype}")
    running = torch.cumsum(lengths.long(), 0)
    if lengths.numel():
        negative, total = torch.stack([(lengths < 0).any().long(), running[-1]]).tolist()
        if negative:
            raise ValueError("lengths must be >= 0")
        if total > torch.iinfo(dtype).max:  # the copy below would wrap around to negative offsets
            raise ValueError(f"{dtype} cannot hold the packed total of {total} tokens: pass dtype=torch.int64")
    out = torch.zeros(lengths.shape[0] + 1, dtype=dtype, device=lengths.device)
    out[1:] = running
    return out


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, *, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """cu_seqlens of a packed batch marked by transformers-style ``position_ids``.

    Args:
        position_ids: (T_total,) or (1, T_total) integer, restarting at 0 for each sequence and counting up by 1
            within it (what ``transformers``' packed-sequence detection and flash-attention's varlen path read).

    Returns:
        (S + 1,) ``dtype`` tensor on position_ids' device. Raises ValueError for a batch dimension other than 1,
        a first position other than 0, or a step within a sequence other than +1 (a restart must go to 0).
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point \
            or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got {shape_of(position_ids)}")
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids of a packed batch must have shape (T_total,) or (1, T_total), got "
                         f"{shape_of(position_ids)}")
    pos = position_ids.long()
    if pos.numel() == 0:
        return torch.zeros(1, dtype=dtype, device=pos.device)
    starts = pos == 0
    steps_ok = (pos[1:] == pos[:-1] + 1) | starts[1:]
    first_ok, all_ok = torch.stack([starts[0], steps_ok.all()]).tolist()
    if not first_ok:
        raise ValueError(f"position_ids must start at 0, got {int(pos[0])}")
    if not all_ok:
        at = int((~steps_ok).nonzero()[0, 0]) + 1
        raise ValueError(f"position_ids must count up by 1 within a sequence and restart at 0 for the next one; at "
                         f"token {at} it goes from {int(pos[at - 1])} to {int(pos[at])}")
    begin = starts.nonzero().flatten()
    out = torch.empty(begin.numel() + 1, dtype=dtype, device=pos.device)
    out[:-1] = begin
    out[-1] = pos.numel()
    return out


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T_total,) int64 positions restarting at 0 for each sequence of ``cu_seqlens`` (checked)."""
    total = int(cu_seqlens[-1]) if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel() else 0
    lengths = check_cu_seqlens(cu_seqlens, total)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(total, device=cu_seqlens.device) - starts


def _padded_mask(lengths: torch.Tensor, width: int | None = None, *, total: int | None = None,
                 name: str = "values") -> torch.Tensor:
    """(S, width) bool, width = the longest length by default: True on the first lengths[i] entries of row i.
    Reading the width, with ``total`` given, also checks that the lengths are >= 0 and sum to ``total`` (the
    length of the tensor ``name``): a shorter layout would take the first tokens silently."""
    if width is None:
        # a host sync: callers that know the width pass it
        if lengths.numel():
            low, summed, width = torch.stack([lengths.min(), lengths.sum(), lengths.max()]).tolist()
        else:
            low, summed, width = 0, 0, 0
        if total is not None:
            if low < 0:
                raise ValueError(f"lengths must be >= 0, got {low}")
            if summed != total:
                raise ValueError(f"lengths must sum to {name}' length {total} (one length per packed sequence), got "
                                 f"{summed}")
    return torch.arange(width, device=lengths.device) < lengths[:, None]


def segment_sums(values: torch.Tensor, lengths: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Per-sequence sums of packed ``values`` (T_total,), sequences of ``lengths`` (S,) in order -> (S,).

    The values are scattered into a zero-padded (S, longest) matrix in their packed order and summed along its
    rows: the reduction a padded batch of the same rows (padded to its longest row) computes, with no atomic adds,
    so the result is deterministic on every device. Differentiable (the backward is a masked gather). ``width``:
    the longest length when known (the caller then vouches for ``lengths``, as ``sequence_logps`` does with a
    checked layout), else read from ``lengths`` with their checks (>= 0, summing to T_total) at one host sync;
    while ``torch.compile`` traces (no read, and no (S, T_total) matrix) ``torch.segment_reduce`` sums instead.
    """
    _check_segments("values", values, lengths)
    if width is None and not host_reads_allowed(values, lengths):
        return torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True)
    mask = _padded_mask(lengths, width, total=values.shape[0], name="values")
    return values.new_zeros(mask.shape).masked_scatter(mask, values).sum(dim=1)


def _check_segments(name: str, values, lengths) -> None:
    """``segment_sums`` / ``segment_counts``' shape and dtype checks (no values read)."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError(f"{name} must have shape (T_total,) (the packed tokens), got {shape_of(values)}")
    check_integer_tensor("lengths", lengths, "sequence lengths")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (S,), got {shape_of(lengths)}")


def segment_counts(flags: torch.Tensor, lengths: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Per-sequence counts of True in packed bool ``flags`` (T_total,) -> (S,) int64 (``width`` as in
    ``segment_sums``)."""
    _check_segments("flags", flags, lengths)
    if width is None and not host_reads_allowed(flags, lengths):  # exact: counts are far below 2^24
        return torch.segment_reduce(flags.float(), "sum", lengths=lengths, unsafe=True).round().long()
    mask = _padded_mask(lengths, width, total=flags.shape[0], name="flags")
    return torch.zeros(mask.shape, dtype=torch.long, device=flags.device).masked_scatter(mask, flags.long()).sum(1)


def pack_padded(attention_mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Remove the padding of right-padded (B, T) tensors: each becomes (1, T_total), rows concatenated.

    Args:
        attention_mask: (B, T) bool or 0/1: 1 on each row's tokens, which must come first (right padding).
        tensors: (B, T, ...) tensors laid out like it (input_ids, labels, completion_mask, ...).

    Returns:
        (cu_seqlens (B + 1,) int32, position_ids (1, T_total) int64, *packed tensors of shape (1, T_total, ...)).
        Labels shifted within the padded rows (``fastkto.shift_labels``) stay aligned: no shift crosses a row.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a (B, T) tensor, got {shape_of(attention_mask)}")
    keep = attention_mask != 0
    lengths = keep.sum(1)
    if not bool((keep == _padded_mask(lengths, keep.shape[1])).all()):
        raise ValueError("attention_mask must be right-padded (each row's ones first, then zeros) to be packed")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or tuple(t.shape[:2]) != tuple(keep.shape):
            raise ValueError(f"tensor {i} must have attention_mask's (B, T) = {tuple(keep.shape)}, got {shape_of(t)}")
    cu = cu_seqlens_from_lengths(lengths)
    pos = position_ids_from_cu_seqlens(cu)[None]
    return (cu, pos, *(t[keep][None] for t in tensors))

