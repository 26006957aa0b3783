"""Small argument checks shared by the package's modules, so that one kind of bad input reads the same everywhere.

Each check raises TypeError for a value of the wrong kind and ValueError for one of the right kind out of range, with
the argument's name and what was expected in the message, and returns the value when it passes. ``bool`` is never
accepted where a number is expected (``True`` is an ``int`` to Python, never a sensible beta or length).

Checks on tensor *values* (labels in range, packed layouts) live in ``value_checks`` (one host sync per call).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "is_number",
    "shape_of",
    "check_positive",
    "check_nonnegative",
    "check_choice",
    "check_int",
    "check_bool",
    "check_count",
    "check_process_group",
    "check_integer_tensor",
]


def is_number(value) -> bool:
    """A Python int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shape_of(t) -> str:
    """The shape of a tensor as a tuple string, or the type name of anything else (for error messages)."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_integer_tensor(name: str, value, what: str) -> None:
    """TypeError unless ``value`` is a tensor of integers (not bool): ``what`` says what they are."""
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype.is_complex \
            or value.dtype == torch.bool:
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be an integer tensor of {what}, got {got}")


def _number(name: str, value) -> bool:
    """TypeError unless ``value`` is a number; False while Dynamo traces (its values are then symbolic)."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    # dynamic=True traces Python numbers symbolically: their values are checked by the eager calls
    return not torch.compiler.is_compiling()


def check_positive(name: str, value) -> float:
    """A finite number > 0, returned as a float (as given while Dynamo traces)."""
    if not _number(name, value):
        return value
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    """A finite number >= 0, returned as a float (as given while Dynamo traces)."""
    if not _number(name, value):
        return value
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_int(name: str, value) -> int:
    """A Python int, not a bool, that fits in int64 (e.g. ``ignore_index``, compared with int64 tensors)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64 (it is compared with int64 label tensors), got {value}")
    return value


def check_bool(name: str, value, *, optional: bool = False) -> bool | None:
    """A bool (or None when ``optional``)."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, got {type(value).__name__}")
    return value


def check_process_group(name: str, value) -> None:
    """None or a ``torch.distributed.ProcessGroup`` (``dist.group.WORLD`` is one once initialized): anything else
    would fail inside a collective ("'str' object has no attribute 'allreduce'")."""
    if value is not None and torch.distributed.is_available() \
            and not isinstance(value, torch.distributed.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (or None), got {type(value).__name__}")


def check_count(name: str, value, *, minimum: int = 1, optional: bool = False) -> int | None:
    """An int >= ``minimum`` (or None when ``optional``): a length, a count, a budget. ValueError names the value."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")
    return value
