"""What a tile costs outside its matrix products, read from the SASS, and what a register cap changes there.

``benchmarks.roofline`` charges every 128 x 128 tile of the Triton kernels an exposed epilogue (the forward's
online max / exp / sums, the dz kernel's formula and store) whose size it fitted to an H200 run. This tool derives
the same quantity without a GPU: it compiles a kernel as the dispatch launches it (``compile_check.compile_kernel``),
disassembles the cubin (``cuobjdump -sass``), finds the loops (backward branches), and counts the instructions

- of the main loop (the innermost loop, the one with the tensor-core instructions): issued once per D step;
- of a tile outside it: the forward's vocabulary loop less its main loop (fold, address updates, the pipeline's
  fill); for the dz kernel, which makes one tile per program, the whole kernel less its main loop.

An SM issues one instruction per scheduler per clock (4 schedulers) for its warps, so a tile's non-product work
takes at least ``instructions x num_warps / 4`` SM clocks, whatever the latencies: an issue-bound floor, to hold
against the fitted epilogue. The count is static: every instruction of a loop body counts once, including code on
branches a tile may skip.

Next to each configuration the tool compiles the same kernel under a register cap (``--maxnreg``, default
``compile_check.HEADROOM_CAP``): where ptxas takes all 255 registers, this shows what a cap costs in instructions
(rematerialized predicates and addresses), before a GPU times it.

Commands::

    python -m tools.sass_profile --out benchmarks/results/compile/sass_profile.md
    python -m tools.sass_profile --only fwd-bf16-sm90-none --config fwd/16=128,128,64,8,3
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tools import compile_check as cc

__all__ = ["Instruction", "Loop", "parse_sass", "find_loops", "Profile", "profile_case", "profile_sass", "main",
           "CLOCK_GHZ", "VARIANTS"]

# boost clocks (GHz): H200 / H100 SXM for sm_90, A100 SXM for sm_80; a card under its power limit runs slower
CLOCK_GHZ = {80: 1.41, 90: 1.98}
SCHEDULERS = 4  # warp schedulers per SM, each issuing one instruction per clock (sm_80, sm_90)
FMA_PER_CLOCK = 1024  # dense 16-bit tensor-core multiply-adds per SM per clock (A100, H100 / H200)
# the variants profiled: no switch, the soft-cap alone (its epilogue is the costliest), every switch
VARIANTS = {"fwd": ("none", "softcap", "bias+rows+softcap"), "dz": ("none", "softcap", "bias+softcap")}

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T\d]+\s+")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\()?(0x[0-9a-f]+)")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # without modifiers: "HGMMA", "FADD", ...
    text: str


@dataclass(frozen=True)
class Loop:
    """The instructions from a backward branch's target to the branch (a loop body, nested loops included)."""

    start: int
    end: int  # the branch's address
    body: tuple[Instruction, ...]

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and self != other


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` output (one function), in address order."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            body = _PREDICATE.sub("", m.group(2))
            out.append(Instruction(int(m.group(1), 16), body.split()[0].split(".")[0], m.group(2)))
    return out


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop: a branch to an earlier address opens one; the self-branch after EXIT (a trap) is not a loop."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    loops = []
    for i, ins in enumerate(instructions):
        m = _BRANCH.search(ins.text) if ins.opcode == "BRA" else None
        if m and int(m.group(1), 16) < ins.address and int(m.group(1), 16) in index:
            loops.append(Loop(int(m.group(1), 16), ins.address, tuple(instructions[index[int(m.group(1), 16)]:i + 1])))
    return loops


@dataclass
class Profile:
    """Static instruction counts of one compilation (per warp) and the issue-bound clocks they imply (per SM)."""

    label: str
    config: str
    maxnreg: int | None
    registers: int
    spill: int  # local + stack bytes
    main_loop: int  # instructions of the innermost loop (one D step)
    tile: int  # instructions per tile outside the main loop
    tile_ops: dict[str, int] = field(default_factory=dict)  # the tile's most frequent opcodes
    num_warps: int = 8
    block: tuple[int, int, int] = (128, 128, 64)  # BLOCK_N, BLOCK_V, BLOCK_D

    @property
    def tile_clocks(self) -> float:
        """SM clocks to issue one tile's non-product instructions (all its warps)."""
        return self.tile * self.num_warps / SCHEDULERS

    @property
    def main_issue_share(self) -> float:
        """Issue clocks of a D step over its tensor-core clocks (below 1: the main loop is not issue-bound)."""
        n, v, d = self.block
        return self.main_loop * self.num_warps / SCHEDULERS / (n * v * d / FMA_PER_CLOCK)


def profile_sass(text: str, kernel: str) -> tuple[int, int, dict[str, int]]:
    """(main-loop instructions, per-tile instructions outside it, the tile's top opcodes) of one kernel's SASS."""
    instructions = parse_sass(text)
    loops = find_loops(instructions)
    mma = [lp for lp in loops if any(i.opcode in ("HGMMA", "HMMA") for i in lp.body)]
    if not mma:  # IEEE fp32 products are FMA loops, which this profile does not tell from the epilogue's FMAs
        raise ValueError("no loop with tensor-core instructions (HGMMA, HMMA) in the SASS")
    main = min(mma, key=lambda lp: len(lp.body))
    if kernel == "fwd":  # the vocabulary loop: the outermost loop around the main loop
        outer = [lp for lp in loops if lp.contains(main)]
        if not outer:
            raise ValueError("the forward's SASS has no loop around its main loop")
        scope = list(max(outer, key=lambda lp: len(lp.body)).body)
    else:  # one tile per program: the whole kernel up to its last EXIT
        last_exit = max(i for i, ins in enumerate(instructions) if ins.opcode == "EXIT")
        scope = instructions[:last_exit + 1]
    tile = [ins for ins in scope if not main.start <= ins.address <= main.end]
    ops = collections.Counter(ins.opcode for ins in tile).most_common(6)
    return len(main.body), len(tile), dict(ops)


def profile_case(case: cc.Case) -> Profile:
    """Compile one case (``compile_check.compile_kernel``) and profile its SASS."""
    kernel, cfg = cc.compile_kernel(case)
    cubin = kernel.asm["cubin"]
    usage = cc._res_usage(cubin)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([cc._tool("cuobjdump"), "-sass", str(path)], check=True, capture_output=True,
                              text=True).stdout
    main_loop, tile, ops = profile_sass(sass, case.kernel)
    return Profile(case.label, f"N{cfg.BLOCK_N} V{cfg.BLOCK_V} D{cfg.BLOCK_D} w{cfg.num_warps} s{cfg.num_stages}",
                   case.maxnreg or cfg.maxnreg, usage["REG"], usage["LOCAL"] + usage["STACK"], main_loop, tile, ops,
                   cfg.num_warps, (cfg.BLOCK_N, cfg.BLOCK_V, cfg.BLOCK_D))


def _table(rows: list[tuple[cc.Case, Profile]]) -> str:
    lines = ["| kernel | dtype | target | variant | config | cap | registers | spill (B) | main loop (instr/warp) "
             "| main loop issue / tensor-core clocks | tile outside it (instr/warp) | issue-bound us / tile "
             "| tile's most frequent opcodes |", "|---" * 13 + "|"]
    for case, p in rows:
        us = p.tile_clocks / (CLOCK_GHZ[case.target] * 1e3)
        ops = ", ".join(f"{k} {v}" for k, v in p.tile_ops.items())
        lines.append(f"| {cc.KERNELS[case.kernel]} | {case.dtype} | sm_{case.target} | {case.variant} | {p.config} "
                     f"| {p.maxnreg or '-'} | {p.registers} | {p.spill} | {p.main_loop} | {p.main_issue_share:.2f} "
                     f"| {p.tile} | {us:.2f} | {ops} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.sass_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="keep the cases whose label contains TEXT (default: bf16, the VARIANTS); repeatable")
    parser.add_argument("--config", action="append", default=[], type=cc._parse_config,
                        metavar="K/W=N,V,D,WARPS,STAGES[,MAXNREG]", help="this tile shape instead; repeatable")
    parser.add_argument("--maxnreg", type=int, default=cc.HEADROOM_CAP,
                        help="also compile each case under this register cap (0: do not)")
    args = parser.parse_args(argv)

    configs = dict(args.config)
    todo = [replace(c, config=configs.get(f"{c.kernel}/{cc.DTYPES[c.dtype][1]}")) for c in cc.cases()
            if (any(t in c.label for t in args.only) if args.only
                else c.dtype == "bf16" and c.variant in VARIANTS[c.kernel])]
    start = time.perf_counter()
    rows = []
    for case in todo:
        for cap in (None, args.maxnreg or None) if args.maxnreg else (None,):
            capped = replace(case, maxnreg=cap)
            rows.append((capped, profile_case(capped)))
    table = _table(rows)
    print(table)
    if args.out:
        import triton

        command = " ".join(["python -m tools.sass_profile", *(argv if argv is not None else sys.argv[1:])])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# SASS profile: the Triton kernels' instructions per tile\n\nGenerated by `{command}` with Triton "
            f"{triton.__version__} on a machine without a GPU in {time.perf_counter() - start:.0f} s. "
            f"`tools/sass_profile.py` says what is counted. Counts are per warp; \"issue-bound us / tile\" is "
            f"instructions x warps / {SCHEDULERS} schedulers at the boost clock ({CLOCK_GHZ[90]} GHz on sm_90, "
            f"{CLOCK_GHZ[80]} GHz on sm_80): a floor on the tile's SM time outside its products. \"main loop issue "
            f"/ tensor-core clocks\": a D step's issue clocks over its {FMA_PER_CLOCK} multiply-adds per clock.\n\n"
            f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
