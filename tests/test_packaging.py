"""pyproject.toml's declared ranges against what CI installs and tests (requirements-ci.txt), and the public names.

CI installs exactly requirements-ci.txt, so those versions are the only ones the suite has run on: every lower bound
the package declares must be one of them (a lower bound below it was never tested), and TRL, whose internals
fastkto.integrations.trl patches, must be capped below its next minor release.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: str = "requirements-ci.txt") -> dict[str, str]:
    pins = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    yield "dependencies", project["dependencies"]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        yield f"extra {extra!r}", reqs


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("where, req", [(w, r) for w, reqs in _requirements() for r in reqs])
def test_lower_bounds_are_what_ci_tests(where, req):
    name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
    lower = re.search(r">=\s*([\d.]+)", req)
    assert lower, f"{where}: {req!r} declares no lower bound"
    pins = _pins()
    assert name in pins, f"{where}: {name} is declared but CI (requirements-ci.txt) does not install it"
    # the floor may leave out the patch number (torch>=2.13 for 2.13.0) but not name an older release than a
    # tested one: CI's, or for torch and triton the GPU image's, which scripts/test_floor.sh installs and tests
    floor = _version(lower.group(1))
    tested = [pins[name]] + [v for n, v in _pins("scripts/floor-requirements.txt").items() if n == name]
    assert any(floor == _version(v)[: len(floor)] for v in tested), (
        f"{where}: {req!r} allows versions that are never tested; tested: {name} {tested}"
    )


def test_torch_and_triton_accept_the_gpu_image():
    """A GPU user keeps the torch / triton they have: the floors are the GPU image's (torch 2.11, triton 3.6), the
    oldest versions scripts/test_floor.sh tests, not CI's newer pins."""
    floors = _pins("scripts/floor-requirements.txt")
    assert (floors["torch"], floors["triton"]) == ("2.11.0", "3.6.0")
    reqs = {re.match(r"[a-z]+", r).group(0): r for _, rs in _requirements() for r in rs}
    assert _version(re.search(r">=\s*([\d.]+)", reqs["torch"]).group(1)) == (2, 11)
    assert _version(re.search(r">=\s*([\d.]+)", reqs["triton"]).group(1)) == (3, 6)


def test_trl_is_capped_below_its_next_minor_release():
    """fastkto.integrations.trl replaces TRL's add_fused_lm_head inside the trainers' __init__ (a TRL internal)."""
    reqs = [r for _, reqs in _requirements() for r in reqs if re.match(r"trl\b", r)]
    assert reqs
    major, minor = _version(_pins()["trl"])[:2]
    for req in reqs:
        upper = re.search(r"<\s*([\d.]+)", req)
        assert upper and _version(upper.group(1)) == (major, minor + 1), req


def test_no_extra_for_code_the_wheel_does_not_ship():
    """The benchmarks live in the repository, not in the wheel (packages: fastkto*): a 'bench' extra would install
    matplotlib and rich for code a wheel user does not have."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["fastkto*"]
    assert "bench" not in project["project"].get("optional-dependencies", {})


def test_public_names():
    import fastkto
    import fastkto.loss

    for name in ("kto_loss", "kto_kl", "dpo_loss", "KTOLoss", "DPOLoss", "suggest_kto_weights", "shift_labels",
                 "fused_logprobs", "sequence_logps"):
        assert name in fastkto.__all__, name
    assert all(hasattr(fastkto, name) for name in fastkto.__all__)
    assert fastkto.KTOLoss is fastkto.loss.KTOLoss


def test_python_floor_is_the_tested_one():
    """CI runs Python 3.11 (the README's set-up); 3.10 was declared but never run."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _version(project["requires-python"])[:2] == (3, 11)


def test_a_clone_folder_named_fastkto_does_not_shadow_the_package(tmp_path):
    """A script beside a clone of this repository (a folder named ``fastkto``) imports the package, not the clone.

    With the flat layout the clone folder (no ``__init__.py`` at its top) was imported as a namespace package ahead
    of the editable install's finder, and ``fastkto.shift_labels`` raised AttributeError; the ``src/`` layout puts
    the package one level down, where a folder named after it cannot be mistaken for it.
    """
    import os
    import subprocess
    import sys

    clone = tmp_path / "fastkto"
    (clone / "src").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    script = tmp_path / "train.py"
    script.write_text("import fastkto\nprint(fastkto.shift_labels.__module__, fastkto.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert str(clone) not in out.stdout
    assert Path(out.stdout.split()[-1]).name == "__init__.py"
    assert (ROOT / "src" / "fastkto" / "__init__.py").is_file() and not (ROOT / "fastkto").exists()
