"""Compile checks: every Triton kernel, in every configuration and switch combination the dispatch can launch,
compiled for sm_80 and sm_90 on a machine without a GPU (``tools/compile_check.py`` does the work and documents the
checks), with tests that the checks catch what they claim to catch and that the kept report is current. One test
(marked ``cuda``) confirms on a GPU that a launch runs exactly the PTX the offline check compiled.

The suite runs with TRITON_INTERPRET=1 on the CPU; ``run_checks`` then compiles in a child process without it.
All compilations run once per session (about 200 CPU seconds with an empty Triton cache, seconds with a warm one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the compile checks need Triton (pip install fastkto[triton])")

from fastkto.kernels import fused_logprob as fl  # noqa: E402
from tools import compile_check as cc  # noqa: E402

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compile" / "compile_report.md"
REGENERATE = "python -m tools.compile_check --out benchmarks/results/compile/compile_report.md"


def _cuobjdump_missing() -> bool:
    try:
        cc._tool("cuobjdump")
    except (FileNotFoundError, ImportError):
        return True
    return False


needs_cuda_tools = pytest.mark.skipif(_cuobjdump_missing(), reason="Triton's NVIDIA backend tools (cuobjdump) are "
                                      "not installed")


def _config_str(kernel: str, dtype: str) -> str:
    cfg = fl.gpu_configs()[(kernel, cc.DTYPES[dtype][1])]
    return f"N{cfg.BLOCK_N} V{cfg.BLOCK_V} D{cfg.BLOCK_D} w{cfg.num_warps} s{cfg.num_stages}"


@pytest.fixture(scope="module")
def results() -> dict[str, cc.Result]:
    """Every case of the default matrix, compiled once (in parallel, in a child process on the CPU)."""
    return {r.case.label: r for r in cc.run_checks(cc.cases())}


# ---------------------------------------------------------------------------------------------------------------
# The matrix


def test_matrix_covers_every_dispatch_choice():
    matrix = cc.cases()
    assert len({c.label for c in matrix}) == len(matrix), "case labels must be unique"
    # every (kernel, dtype width) configuration the dispatch can pick, in every dtype of that width
    assert {(c.kernel, cc.DTYPES[c.dtype][1]) for c in matrix} == set(fl.gpu_configs())
    assert {(c.dtype, c.precision) for c in matrix} == {("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"),
                                                        ("fp32", "tf32")}
    # bf16 and both fp32 precisions: every switch combination logprob_fwd / logprob_bwd can launch, per target
    launchable = {"fwd": 8, "dz": 4}  # the dz kernel reads gathered rows: no HAS_ROWS switch
    for kernel, count in launchable.items():
        for dtype, precision in (("bf16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32")):
            for target in cc.TARGETS:
                got = {c.switches for c in matrix if (c.kernel, c.dtype, c.precision, c.target)
                       == (kernel, dtype, precision, target)}
                assert len(got) == count, (kernel, dtype, precision, target)
    assert len(cc.cases(exhaustive=True)) == 96


# ---------------------------------------------------------------------------------------------------------------
# The checks themselves, on synthetic results: each defect must be reported, and a clean result must pass


def _clean(dtype="bf16", precision="ieee", target=90, **kw) -> cc.Result:
    case = next(c for c in cc.cases() if (c.kernel, c.dtype, c.precision, c.target) == ("fwd", dtype, precision,
                                                                                         target))
    fields = dict(config="N64 V64 D64 w4 s3", registers=200, shared=cc.SHARED_LIMIT[target], local=0, stack=0,
                  mma={} if cc.expected_mma(case) is None else {cc.expected_mma(case): 4})
    fields.update(kw)
    return cc.Result(case, **fields)


def test_problems_accepts_a_clean_result():
    for dtype, precision in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32")):
        for target in cc.TARGETS:
            assert cc.problems(_clean(dtype, precision, target)) == []


@pytest.mark.parametrize("defect, needle", [
    (dict(local=16), "local memory"),
    (dict(stack=8), "stack frame"),
    (dict(registers=256), "registers"),
    (dict(registers=0), "registers"),
    (dict(shared=cc.SHARED_LIMIT[90] + 1), "shared memory"),
    (dict(mma={}), "no tensor-core"),
    (dict(mma={"wgmma.bf16": 4, "mma.sync.bf16": 8}), "expected every product on wgmma.bf16"),
    (dict(mma={"wgmma.f16": 4}), "expected every product on wgmma.bf16"),
    (dict(error="PTXASError: boom"), "compilation failed"),
    # at the ceiling, headroom must be shown by a spill-free compilation under the cap
    (dict(registers=255), "not compiled under a cap"),
    (dict(registers=255, capped_spill=8), "8 B of spills under a 232-register cap"),
    (dict(registers=255, capped_spill=-2), "compilation under a cap failed"),
])
def test_problems_reports_each_defect(defect, needle):
    found = cc.problems(_clean(**defect))
    assert len(found) == 1 and needle in found[0], found


def test_ceiling_with_headroom_passes():
    assert not cc.problems(_clean(registers=255, capped_spill=0))
    assert not cc.problems(_clean(registers=254))  # below the ceiling ptxas had room to spare: no cap needed


def test_sm80_limit_and_instruction_differ_from_sm90():
    assert cc.problems(_clean(target=80, shared=cc.SHARED_LIMIT[80] + 1))  # 163 KiB, not Hopper's 227 KiB
    assert cc.problems(_clean(target=80, mma={"wgmma.bf16": 4}))  # sm_80 has no wgmma: a parsing or target error


def test_ieee_fp32_must_not_use_tensor_cores():
    assert cc.expected_mma(_clean("fp32", "ieee").case) is None
    assert cc.problems(_clean("fp32", "ieee", mma={"mma.sync.tf32": 2}))  # tf32 would lose IEEE precision
    assert cc.expected_mma(_clean("fp32", "tf32", 90).case) == "wgmma.tf32"
    assert cc.expected_mma(_clean("fp32", "tf32", 80).case) == "mma.sync.tf32"
    assert cc.expected_mma(_clean("fp16", target=80).case) == "mma.sync.f16"


def test_tensor_core_ops_reads_ptx():
    ptx = """
        wgmma.fence.sync.aligned;
        wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
        wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f1}, %rd1, %rd2, p, 1, 1;
        wgmma.commit_group.sync.aligned;
        mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1, %f2, %f3, %f4}, {%r1}, {%r2}, {%f5};
        mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1, %f2, %f3, %f4}, {%r1}, {%r2}, {%f5};
        fma.rn.f32 %f1, %f2, %f3, %f4;
    """
    assert cc.tensor_core_ops(ptx) == {"wgmma.bf16": 1, "wgmma.tf32": 1, "mma.sync.f16": 2}
    assert cc.tensor_core_ops("fma.rn.f32 %f1, %f2, %f3, %f4;") == {}


def test_parse_res_usage():
    text = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function _logprob_fwd_kernel:\n"
            "  REG:234 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    usage = cc.parse_res_usage(text)
    assert (usage["REG"], usage["STACK"], usage["SHARED"], usage["LOCAL"]) == (234, 16, 1024, 8)
    with pytest.raises(ValueError, match="one function"):
        cc.parse_res_usage("Resource usage:\n Common:\n  GLOBAL:0\n")


# ---------------------------------------------------------------------------------------------------------------
# Real compilations


@needs_cuda_tools
def test_checks_catch_real_compiler_defects():
    """Compile three deliberately bad variants: the checks must see each defect in the compiler's own output."""
    base = {c.label: c for c in cc.cases()}
    # 128 registers for a kernel that needs ~240: ptxas must spill
    spill = replace(base["fwd-bf16-sm80-none"], maxnreg=128)
    # 16-row token tiles: wgmma works on 64 rows per warpgroup, so Triton falls back to mma.sync on sm_90
    no_wgmma = replace(base["fwd-bf16-sm90-none"], config=(16, 128, 64, 4, 2))
    # 4 stages of 64x256 + 256x128 bf16 operand tiles: 384 KiB of shared memory
    big_smem = replace(base["fwd-bf16-sm90-none"], config=(64, 128, 256, 4, 4))
    r_spill, r_mma, r_smem = cc.run_checks([spill, no_wgmma, big_smem], jobs=1)
    assert not (r_spill.error or r_mma.error or r_smem.error), (r_spill.error, r_mma.error, r_smem.error)
    assert r_spill.stack + r_spill.local > 0 and any("spill" in p for p in cc.problems(r_spill))
    assert r_mma.mma.get("mma.sync.bf16", 0) > 0
    assert any("expected every product on wgmma.bf16" in p for p in cc.problems(r_mma))
    assert r_smem.shared > cc.SHARED_LIMIT[90] and any("shared memory" in p for p in cc.problems(r_smem))


@needs_cuda_tools
def test_headroom_check_compiles_under_the_cap():
    """A result at the ceiling is compiled again under the cap: the plain sm_80 forward fits in HEADROOM_CAP
    registers, so its spill bytes are recorded as 0 and it passes (test_checks_catch_real_compiler_defects shows
    that a cap of 128 makes the same kernel spill, and the synthetic tests that such spills fail the check)."""
    case = {c.label: c for c in cc.cases()}["fwd-bf16-sm80-none"]
    roomy = cc.Result(case, registers=255)
    cc.check_headroom([roomy], jobs=1)
    assert roomy.capped_spill == 0 and roomy.capped_at == cc.HEADROOM_CAP, roomy
    below = cc.Result(case, registers=200)
    assert cc.check_headroom([below])[0].capped_spill == -1  # nothing to show below the ceiling
    # a configuration's own cap (KernelConfig.maxnreg, the sweep's capped rows) reaches ptxas through the dispatch
    cfg = fl.gpu_configs()[("fwd", "16")]
    (capped,) = cc.run_checks([replace(case, config=(*dataclasses.astuple(cfg)[:5], cc.HEADROOM_CAP))], jobs=1)
    assert capped.config.endswith(f" r{cc.HEADROOM_CAP}") and 0 < capped.registers <= cc.HEADROOM_CAP, capped
    assert not cc.problems(capped)


@needs_cuda_tools
@pytest.mark.parametrize("case", cc.cases(), ids=lambda c: c.label)
def test_kernel_compiles_clean(case, results):
    """No spills or stack, registers and shared memory within the target's limits, the right MMA instructions."""
    result = results[case.label]
    assert result.config == _config_str(case.kernel, case.dtype), "compiled a tile shape the dispatch does not pick"
    found = cc.problems(result)
    assert not found, f"{case.label} ({result.config}): " + "; ".join(found)


@pytest.mark.parametrize("report, regenerate", [
    (REPORT, REGENERATE),
    # the GPU image's Triton (3.6), compiled in a virtual environment of its own: another ptxas, other registers
    (REPORT.with_name("compile_report_triton3.6.md"), "python -m tools.compile_check --out "
     "benchmarks/results/compile/compile_report_triton3.6.md (in an environment with triton==3.6.0)"),
])
def test_kept_report_lists_the_current_matrix(report, regenerate):
    """The kept compile reports must describe today's configurations and variants, every row passing."""
    REPORT, REGENERATE = report, regenerate  # noqa: N806 - the names the messages below use
    assert REPORT.is_file(), f"missing {REPORT}: run {REGENERATE}"
    text = REPORT.read_text()
    table = text.split("## Every compilation", 1)[1]
    rows = set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[0].startswith("_logprob"):
            rows.add(tuple(cells[:5]))
            assert cells[-1] == "yes", f"the kept report has a failing row: {line}"
    expected = set()
    for c in cc.cases():
        dtype = f"{c.dtype} ({c.precision})" if c.dtype == "fp32" else c.dtype
        expected.add((cc.KERNELS[c.kernel], _config_str(c.kernel, c.dtype), dtype, f"sm_{c.target}", c.variant))
    assert rows == expected, f"the kept report is stale (configurations or variants changed): run {REGENERATE}"
    assert re.search(r"Generated by `python -m tools\.compile_check", text)
    if "triton3.6" in REPORT.name:
        assert "with Triton 3.6." in text, "the Triton 3.6 report must be compiled with Triton 3.6"


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the launch compiles exactly what the offline check compiled


@pytest.mark.cuda
def test_launched_kernels_are_the_checked_compilations(seed):
    import torch

    if fl.INTERPRET:
        pytest.skip("kernels are interpreted (TRITON_INTERPRET=1)")
    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    # M and V not multiples of 16, D one: the integer specialization the offline checks compile (the dz tile's
    # row stride is padded to 16, its first vocabulary row is 0)
    m_tokens, vocab, dim = 100, 1000, 128
    hidden = torch.randn(m_tokens, dim, device=dev, dtype=torch.bfloat16)
    weight = torch.randn(vocab, dim, device=dev, dtype=torch.bfloat16) * 0.1
    labels = torch.randint(vocab, (m_tokens,), device=dev)
    row_max, sum_exp, _ = fl.logprob_fwd(hidden, weight, None, None, labels)
    lse = row_max + sum_exp.log()
    fl.logprob_bwd(hidden, weight, None, None, labels, lse, torch.ones(m_tokens, device=dev), need_bias=False)
    torch.cuda.synchronize()

    limit = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
    for kernel, variant in (("fwd", "none"), ("dz", "none")):
        case = next(c for c in cc.cases() if (c.kernel, c.dtype, c.variant) == (kernel, "bf16", variant))
        offline = cc.compile_case(replace(case, target=10 * major + minor))
        assert not offline.error, offline.error
        fn = getattr(fl, cc.KERNELS[kernel])
        launched = [k for cache in fn.device_caches.values() for k in cache[0].values()]
        assert launched, f"{fn.__name__} was not compiled by the launch"
        for k in launched:  # whatever this process launched so far: the driver's own numbers
            getattr(k, "_init_handles", lambda: None)()  # loads the binary lazily on Triton >= 3.1
            assert k.n_spills == 0 and 0 < k.n_regs <= cc.MAX_REGISTERS, (fn.__name__, k.n_regs, k.n_spills)
            assert k.metadata.shared <= limit, (fn.__name__, k.metadata.shared, limit)
        shas = {hashlib.sha256(k.asm["ptx"].encode()).hexdigest() for k in launched}
        assert offline.ptx_sha256 in shas, (
            f"{fn.__name__}: the launch compiled different PTX than the offline check: the check's argument "
            f"types or specialization (compile_check._arg_types / _ALIGNED_INTS) no longer match the launch")
        launched_regs = {k.n_regs for k in launched}
        assert offline.registers in launched_regs, (offline.registers, launched_regs)


# ---------------------------------------------------------------------------------------------------------------
# fp32 product precision


@pytest.mark.parametrize("setting, tf32", [("tf32", True), ("ieee", False)])
def test_fp32_precision_follows_the_new_torch_api(monkeypatch, setting, tf32):
    """The fp32 dot precision reads torch.backends.cuda.matmul.fp32_precision when the user set it: the legacy
    getter raises then (torch >= 2.9), which made fp32 inputs on the Triton path fail."""
    import torch

    matmul = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    before = matmul.fp32_precision
    monkeypatch.setattr(fl, "INTERPRET", False)  # the interpreter always takes IEEE dots
    try:
        matmul.fp32_precision = setting
        if tf32:  # what the dispatch called before raises (torch reads "ieee" as the legacy "highest")
            with pytest.raises(RuntimeError, match="legacy and new"):
                torch.get_float32_matmul_precision()
        assert fl.fp32_matmul_allows_tf32() is tf32
        assert fl._precision(torch.float32) == ("tf32" if tf32 else "ieee")
        assert fl._precision(torch.bfloat16) == "ieee"
    finally:
        matmul.fp32_precision = before
    # and the legacy API as before
    previous = torch.get_float32_matmul_precision()
    try:
        for legacy, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(legacy)
            assert fl._precision(torch.float32) == want
    finally:
        torch.set_float32_matmul_precision(previous)


# ---------------------------------------------------------------------------------------------------------------
# The token-statistics variants (fastkto.token_stats): their own tile shapes, compiled without spills


def test_token_statistics_variants_compile_without_spills():
    """The heaviest statistics variants (forward STATS 2 and dz ENT_GRAD, every switch on, bf16) for both targets;
    ``python -m tools.compile_check --stats`` compiles the whole matrix
    (``benchmarks/results/compile/compile_report_stats.md``)."""
    todo = [c for c in cc.stats_cases() if c.dtype == "bf16" and c.variant in ("bias+rows+softcap+stats2",
                                                                              "bias+softcap+entgrad")]
    # and one the fp32 forward's 128-register cap keeps from spilling (ptxas alone chose 80 registers + 16 B)
    todo += [c for c in cc.stats_cases() if c.label == "fwd-fp32-ieee-sm80-softcap+stats1"]
    assert len(todo) == 5
    for r in cc.run_checks(todo, jobs=2):
        assert not cc.problems(r), (r.case.label, cc.problems(r))
        assert r.registers < cc.MAX_REGISTERS, (r.case.label, r.registers)


def test_statistics_matrix_covers_every_launchable_variant():
    matrix = cc.stats_cases()
    assert len({c.label for c in matrix}) == len(matrix)
    assert {(c.kernel, cc.DTYPES[c.dtype][1]) for c in matrix} == set(fl.stats_configs())
    for c in matrix:
        sw = dict(c.switches)
        assert (sw.get("stats") in (1, 2)) if c.kernel == "fwd" else sw.get("ent_grad") is True
