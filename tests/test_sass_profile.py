"""tools/sass_profile.py: loops found in SASS, per-tile counts, and one real kernel profiled from its cubin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the SASS profile needs Triton (pip install fastkto[triton])")

from tools import compile_check as cc  # noqa: E402
from tools import sass_profile as sp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _sass(lines: list[str]) -> str:
    """cuobjdump -sass's layout: an address comment, the instruction, its encoding; header lines around."""
    out = ["\tcode for sm_90", "\t\tFunction : k", "\t.headerflags\t@\"EF_CUDA_SM90\""]
    for i, ins in enumerate(lines):
        out.append(f"        /*{16 * i:04x}*/                   {ins} ;      /* 0x000000000000 */")
        out.append("                                                                 /* 0x000fe20000000000 */")
    return "\n".join(out)


# a vocabulary loop (addresses 0x10-0xa0) around a main loop (0x30-0x50), then EXIT and the trap's self-branch
_KERNEL = ["IMAD R1, RZ, RZ, c[0x0][0x28]",  # 0x00
           "FMUL R2, R2, R3",                 # 0x10: the vocabulary loop starts
           "@P0 BRA 0x70",                    # 0x20: skip the main loop (a forward branch: no loop)
           "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24",  # 0x30: the main loop
           "UIADD3 UR4, UR4, 0x2, URZ",       # 0x40
           "@!P5 BRA 0x30",                   # 0x50: back to the main loop
           "MUFU.EX2 R4, R4",                 # 0x60
           "FSEL R5, R4, RZ, P1",             # 0x70
           "FMNMX R6, R6, R5, !PT",           # 0x80
           "@P2 BRA 0x10",                    # 0x90: back to the vocabulary loop
           "EXIT",                            # 0xa0
           "BRA 0xb0"]                        # 0xb0: the trap after EXIT


def test_loops_and_tile_counts_from_sass():
    instructions = sp.parse_sass(_sass(_KERNEL))
    assert [i.opcode for i in instructions][:4] == ["IMAD", "FMUL", "BRA", "HGMMA"]  # predicates, modifiers dropped
    loops = sp.find_loops(instructions)
    assert [(lp.start, lp.end) for lp in loops] == [(0x30, 0x50), (0x10, 0x90)]  # not the trap, not the skip
    assert loops[1].contains(loops[0]) and not loops[0].contains(loops[1])
    # forward: the vocabulary loop's 9 instructions less the main loop's 3
    assert sp.profile_sass(_sass(_KERNEL), "fwd") == (3, 6, {"FMUL": 1, "BRA": 2, "MUFU": 1, "FSEL": 1, "FMNMX": 1})
    # dz (one tile per program): the kernel up to its last EXIT less the main loop
    assert sp.profile_sass(_sass(_KERNEL), "dz")[:2] == (3, 8)
    p = sp.Profile("x", "N128 V128 D64 w8 s4", None, 200, 0, main_loop=3, tile=6)
    assert p.tile_clocks == 6 * 8 / 4  # 8 warps' instructions on 4 schedulers
    assert p.main_issue_share == pytest.approx(3 * 8 / 4 / (128 * 128 * 64 / 1024))


def test_a_kernel_without_a_tensor_core_loop_is_an_error():
    no_mma = [k.replace("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24", "FFMA R24, R25, R26, R24") for k in _KERNEL]
    with pytest.raises(ValueError, match="tensor-core"):
        sp.profile_sass(_sass(no_mma), "fwd")
    with pytest.raises(ValueError, match="no loop around"):
        sp.profile_sass(_sass(_KERNEL[:3] + _KERNEL[3:6] + ["EXIT"]), "fwd")


def test_profile_of_the_compiled_forward():
    """The sm_90 bf16 forward as the dispatch compiles it: a wgmma main loop that issues in a fraction of its
    tensor-core time, and a tile's fold of more instructions than a D step (run in a child without the
    interpreter, as compile_check's ``run_checks`` does)."""
    try:
        cc._tool("cuobjdump")
    except (FileNotFoundError, ImportError):
        pytest.skip("Triton's NVIDIA backend tools (cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "tools.sass_profile", "--only", "fwd-bf16-sm90-none", "--maxnreg",
                           "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| _logprob_fwd_kernel")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0]]
    registers, spill, main_loop, share, tile = int(cells[6]), int(cells[7]), int(cells[8]), float(cells[9]), \
        int(cells[10])
    assert cells[2] == "sm_90" and cells[5] == "-" and 0 < registers <= 255 and spill == 0
    assert 0 < main_loop < tile and 0 < share < 1
    # a thread holds 128 x 128 / 256 = 64 logits of a tile: each takes at least a scale, a max, an exp and a sum
    assert tile >= 4 * 64 and "FMUL" in cells[12] and "FMNMX" in cells[12]
