"""Checks on tensor values with one host sync for a whole call, and none while ``torch.compile`` traces.

Reading a device tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``) waits for every
kernel queued before it: on a GPU the first one in a loss call waits for the whole backbone forward, and any of
them rules out CUDA graphs. fastkto's value checks (labels in range, rows with a scored token, a packed layout)
therefore register 0-d device tensors here, and a call reads all of them at once.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["host_reads_allowed", "ValueChecks"]


def host_reads_allowed(*tensors) -> bool:
    """False while Dynamo traces a call or under fake tensors: then no value can be read on the host, and the
    value checks run on the device (``torch._assert_async``) or not at all (fake tensors have no values)."""
    if torch.compiler.is_compiling():
        return False
    return not any(isinstance(t, FakeTensor) for t in tensors) and torch._guards.detect_fake_mode() is None


class ValueChecks:
    """Checks on tensor values, gathered from every pass of a call and read with one host sync.

    ``add(facts, ok, message, read)`` registers 0-d integer tensors (``facts``), a 0-d bool tensor that is True when
    they pass (``ok``; asserted on the device with ``message`` while Dynamo traces; None for a check that only warns)
    and ``read(values)``, which raises the check's named error or returns what the caller needs from the values (None
    where they were not read). ``run`` makes the one sync and returns the ``read`` results in order.
    """

    def __init__(self, *tensors):
        self.readable = host_reads_allowed(*tensors)
        self._checks = []
        self.results: list = []

    def add(self, facts, ok, message, read) -> int:
        """Registers a check; returns its index in ``results``."""
        self._checks.append((facts, ok, message, read))
        return len(self._checks) - 1

    def run(self) -> list:
        """Reads every registered fact with one host sync (none while Dynamo traces: the ``ok`` tensors are asserted
        on the device instead; none under fake tensors), runs the checks in order and returns ``results``."""
        if not self.readable:
            if torch.compiler.is_compiling():  # fake tensors outside a trace have no values to check
                for _, ok, message, _ in self._checks:
                    if ok is not None:  # None: a check that only warns
                        torch._assert_async(ok, message)
            self.results = [read(None) for *_, read in self._checks]
            return self.results
        flat = [f.reshape(()).long() for facts, *_ in self._checks for f in facts]
        values = torch.stack(flat).tolist() if flat else []  # the one host sync
        self.results, at = [], 0
        for facts, _, _, read in self._checks:
            self.results.append(read(values[at:at + len(facts)]))
            at += len(facts)
        return self.results
