"""Fast checks of the benchmark harness (benchmarks/): the naive head and the float64 reference, the memory
meters, the real-data masking, every CPU method's step against the float64 naive step, a worker end to end,
the report, the plots and the memory model. Tiny heads only: the whole file takes well under a minute."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import measure, memory_model, naive, peers, realdata, report, roofline, run, workloads
from fastkto.memory import track_peak_memory
from tests.reference import leaf64, reference_logprobs

ROOT = Path(__file__).resolve().parent.parent
TINY = workloads.HeadShape("tiny", 24, 96)
TINY_CAP = workloads.HeadShape("tiny-softcap", 24, 96, softcap=5.0)


def _has(module: str) -> bool:
    return peers._missing(module, "") is None


# ------------------------------------------------------------------------------------------------ naive / reference

@pytest.mark.parametrize("softcap", [None, 5.0])
def test_naive_logprobs_match_float64_reference(seed, softcap):
    hidden, weight = torch.randn(3, 7, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100
    got = naive.naive_logprobs(hidden, weight, labels, softcap=softcap)
    want = reference_logprobs(hidden, weight, labels, softcap=softcap)
    assert got.dtype == torch.float32
    assert (got[0, :3] == 0).all()
    # float32 logits of O(10): log-softmax rounding ~1e-6 relative; 1e-4 absolute is far below any real bug
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    seq = naive.naive_sequence_logps(hidden, weight, labels, softcap=softcap)
    torch.testing.assert_close(seq, got.sum(-1))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_reference_diffs_are_zero_for_exact_results_and_see_an_error(seed, softcap):
    n, d, v = 6, 8, 40
    hidden, weight = torch.randn(n, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64)
    labels, grad_out = torch.randint(0, v, (n,)), torch.randn(n, dtype=torch.float64)
    h, w = leaf64(hidden), leaf64(weight)
    value = reference_logprobs(h, w, labels, softcap=softcap)
    value.backward(grad_out)
    # vocab_chunk=16 splits the vocabulary into ragged chunks, as the 150k heads are split
    diffs = naive.max_abs_diff_against_reference(hidden, weight, labels, grad_out, value.detach(), h.grad, w.grad,
                                                 softcap=softcap, vocab_chunk=16)
    for key in ("value", "grad_hidden", "grad_weight"):
        assert diffs[key] < 1e-12, (key, diffs)  # float64 against float64: rounding only
        assert diffs[key + "_scale"] > 0
    bad_w = w.grad.clone()
    bad_w[v - 1, 0] += 0.5  # an error in the last (ragged) chunk must be seen
    diffs = naive.max_abs_diff_against_reference(hidden, weight, labels, grad_out, value.detach(), h.grad, bad_w,
                                                 softcap=softcap, vocab_chunk=16)
    assert abs(diffs["grad_weight"] - 0.5) < 1e-9


# ------------------------------------------------------------------------------------------------ memory meters

def test_allocator_peak_equals_track_peak_memory_and_separates_gradients():
    x = torch.randn(256, 256, requires_grad=True)
    point = workloads.Point(lambda: (x @ x).exp().sum().backward(), [x], 0, 0, {})
    with track_peak_memory("cpu") as m:
        point.run()
    x.grad = None
    mem = measure.memory_pass(point, torch.device("cpu"))
    assert mem["alloc_peak_bytes"] == m.peak
    assert mem["grad_bytes"] == x.numel() * 4
    # the pass holds x @ x and its exp (2 blocks of 256 KiB) before the gradient exists
    assert 2 * 256 * 256 * 4 <= mem["peak_extra_bytes"] <= mem["alloc_peak_bytes"]


def test_allocator_peaks_replay_counts_gradients_from_their_allocation():
    # (time, address, size, total after): a 100-byte temporary at address 1, freed; the 40-byte gradient reuses
    # address 1 later; a 30-byte temporary lives beside the gradient
    events = [(0, 1, 100, 1100), (1, 1, -100, 1000), (2, 1, 40, 1040), (3, 2, 30, 1070), (4, 2, -30, 1040)]
    peak, extra = measure.allocator_peaks(events, {1: 40})
    assert peak == 100  # above the 1000 bytes live before the first event
    assert extra == 100  # the temporary's 100 before the gradient existed, not 100 - 40
    assert measure.allocator_peaks([], {}) == (None, None)


@pytest.mark.skipif(not measure.CpuPeakRSS._can_reset(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_rss_sees_a_transient_allocation():
    meter = measure.CpuPeakRSS()
    measure.lower_mmap_threshold()
    base = meter.current()
    meter.start()
    t = torch.ones(16 << 20)  # 64 MiB, touched, then freed
    del t
    peak = meter.stop() - base
    # 64 MiB of touched pages, give or take a few pages the interpreter frees or touches meanwhile
    assert 62 << 20 <= peak < 80 << 20


# ------------------------------------------------------------------------------------------------ real data

def test_batch_layout_keeps_the_real_proportions():
    split = realdata.token_split()  # the committed cache: no tokenizer needed
    assert len(split["pairs"]) == 2307
    for paired in (False, True):
        layout = realdata.batch_layout(split, 8, 256, paired=paired, seed=3)
        assert all(p + c <= 256 for p, c in zip(layout.prompt, layout.completion))
        assert all(p + c <= 256 for p, c in zip(layout.kl_prompt, layout.kl_completion))
        # rounding each row to whole positions moves the fraction by at most 1/2 position per row
        assert abs(layout.scored_fraction - layout.real_fraction) <= 8 * 0.5 / (8 * 256) + 1e-9
    kto = realdata.batch_layout(split, 4, 512, paired=False, seed=5)
    assert kto.kl_prompt == kto.prompt  # KL row i: prompt i ...
    assert kto.kl_completion == kto.completion[-1:] + kto.completion[:-1]  # ... with the completion of row i - 1
    labels = realdata.labels_from_layout([2, 0], [3, 5], 8, 10)
    assert (labels != -100).tolist() == [[False] * 2 + [True] * 3 + [False] * 3, [True] * 5 + [False] * 3]


@pytest.mark.skipif(not realdata.DATA_FILE.exists(), reason="hh-rlhf data file not found (data/)")
def test_split_cache_matches_the_data_file():
    split = realdata.token_split()
    assert split["sha256"] == realdata._sha256(realdata.DATA_FILE)
    assert len(realdata.load_pairs()) == len(split["pairs"])


# ------------------------------------------------------------------------------------------------ methods

def _cpu_step_methods():
    methods = ["naive", "fastkto-torch"]
    methods += ["trl"] if _has("trl.kernels") else []
    methods += ["liger"] if _has("liger_kernel.chunked_loss") else []
    return methods


@pytest.mark.parametrize("kind", ["kto", "dpo"])
@pytest.mark.parametrize("masking", ["none", "real"])
def test_every_cpu_method_matches_the_float64_naive_step(kind, masking, monkeypatch, seed):
    monkeypatch.setattr(peers, "LIGER_COMPILED", False)  # same math, without ~20 s of compilation
    weight = workloads.make_weight(TINY, torch.float32, torch.device("cpu"), seed)
    ref_weight = (weight.detach() + 0.01 * torch.randn_like(weight)).detach()
    split = realdata.token_split()
    for method in _cpu_step_methods():
        diffs = workloads.step_check(kind, method, TINY, 4, 12, masking, weight, ref_weight, seed, split)
        # float32 methods against float64: rounding of O(1) log-probs summed over 12 tokens, ~1e-6
        for key in ("value", "grad_hidden", "grad_weight"):
            assert diffs[key] <= 1e-5 * max(1.0, diffs[key + "_scale"]), (method, key, diffs)


@pytest.mark.parametrize("shape", [TINY, TINY_CAP], ids=["plain", "softcap"])
def test_primitive_methods_match_the_float64_reference(shape, seed):
    weight = workloads.make_weight(shape, torch.float32, torch.device("cpu"), seed)
    methods = ["naive", "fastkto-torch"] + (["trl"] if _has("trl.kernels") else [])
    for method in methods:
        diffs = workloads.primitive_check(method, shape, 10, weight, seed)
        for key in ("value", "grad_hidden", "grad_weight"):
            assert diffs[key] <= 1e-5 * max(1.0, diffs[key + "_scale"]), (method, key, diffs)


def test_skip_reasons():
    cpu = torch.device("cpu")
    assert peers.skip_reason("naive", cpu) is None and peers.skip_reason("fastkto-torch", cpu) is None
    assert "CUDA" in peers.skip_reason("fastkto-triton", cpu)
    assert "CUDA" in peers.skip_reason("cce", cpu)
    with pytest.raises(ValueError, match="unknown method"):
        peers.skip_reason("nope", cpu)


# ------------------------------------------------------------------------------------ worker (run) + report

def test_worker_end_to_end_and_report(tmp_path):
    spec = {"workload": "kto", "methods": ["naive", "fastkto-torch", "cce"], "group": "tiny",
            "shape": {"name": "tiny", "hidden": 32, "vocab": 16384}, "sizes": [32, 64], "batch": 2,
            "masking": "none", "dtype": "float32", "device": "cpu", "seed": 1, "warmup": 1, "repeats": 2,
            "allocator": True, "check": {"primitive_tokens": 4, "batch": 2, "T": 4}}
    progress = []
    results = run.run_job(spec, tmp_path, 0, timeout=120, on_progress=progress.append)
    assert any(text.startswith("naive (1/3)") or text.startswith("fastkto-torch (2/3)") for text in progress), \
        progress  # the job reports what it has measured while it runs
    by_method = {r["spec"]["method"]: r for r in results}
    assert by_method["cce"]["skipped"] and not by_method["cce"]["points"]
    for method in ("naive", "fastkto-torch"):
        r = by_method[method]
        assert r["error"] is None, r.get("traceback")
        assert [p["size"] for p in r["points"]] == [32, 64]
        for p in r["points"]:
            assert p["time_s"] > 0 and len(p["times_s"]) == 2 and p["grad_bytes"] > 0
            assert p["peak_bytes"] > 0 and p["alloc_peak_bytes"] >= p["peak_extra_bytes"] > 0
        assert r["check"]["value"] < 1e-5
    # the naive head holds 12 bytes per logit at its peak (log_softmax output + two float32 gradients); fastkto's
    # workspace is a fixed few MiB (a tile per CPU worker thread), so the vocabulary is large enough for the logits
    # to outweigh it
    naive_big = by_method["naive"]["points"][-1]
    assert naive_big["peak_extra_bytes"] >= 12 * 2 * 64 * 16384
    assert by_method["fastkto-torch"]["points"][-1]["peak_extra_bytes"] < naive_big["peak_extra_bytes"]

    rows = report.summarize(results)
    assert {r["method"] for r in rows} == {"naive", "fastkto-torch"}
    assert all(abs(r["time_vs_naive"] - 1) < 1e-12 for r in rows if r["method"] == "naive")
    machine = {"name": "cpu-2core", "device": "cpu", "dtype": "float32", "worker_threads": 2, "busy_processes": 1,
               "torch": torch.__version__, "quick": True}
    caption = report.plot_caption(machine)
    assert "1 busy process beside the run" in caption and "--quick" in caption and "float32" in caption
    # the load is what was measured, never "quiet" inferred from --busy 0 (issue 22)
    assert "load not recorded" in caption and "quiet" not in caption
    machine.update(busy_processes=0, cpu_count=2, load_avg=run.load_summary([1.5, None, 2.5, 2.0]))
    caption = report.plot_caption(machine)
    assert "load average 2.0 (1.5-2.5) on 2 cores" in caption and "busy" not in caption
    assert run.load_summary([None]) is None and (run.load_average() is None or run.load_average() >= 0)
    files = report.write_plots(rows, tmp_path, machine)
    assert files and all((tmp_path / f).stat().st_size > 1000 for f in files)
    table = report.markdown_tables(rows).splitlines()
    assert table[2] == "| tokens (scored) | naive | fastkto-torch |" and table[4].startswith("| 64 (64) | ")


def test_targets_are_computed_from_the_rows():
    def row(method, size, t, extra, masking="none"):
        return {"workload": "kto", "group": f"smollm2-135m, {masking}", "masking": masking, "method": method,
                "size": size, "tokens": 4 * size, "time_s": t, "peak_extra_bytes": extra, "time_vs_naive": None}

    rows = [row("naive", 64, 1.0, 100 << 20), row("naive", 256, 4.0, 400 << 20),
            row("fastkto-torch", 64, 1.1, 20 << 20), row("fastkto-torch", 256, 5.2, 21 << 20),
            row("trl", 64, 1.2, 30 << 20), row("trl", 256, 5.0, 90 << 20)]
    for r in rows:
        r["time_vs_naive"] = r["time_s"] / (1.0 if r["size"] == 64 else 4.0)
    got = {t["target"]: t["met"] for t in report.targets(rows, torch.device("cpu"))}
    assert got["KTO step (no masking): fastkto-torch peak extra memory flat as tokens grow 4x and <= 64 MiB"]
    assert not got["KTO step (no masking): time <= 1.25x naive"]  # 5.2 / 4.0 = 1.3
    assert not got["KTO step (no masking): fastkto-torch faster than trl"]  # 5.2 > 5.0 at 256
    # with a busy process beside the run: the shared-core targets
    prim = [{"workload": "primitive", "group": "smollm2-135m", "masking": "none", "method": m, "size": n,
             "tokens": n, "time_s": t, "peak_extra_bytes": 1, "time_vs_naive": t / 2.0}
            for m, n, t in (("naive", 1024, 2.0), ("fastkto-torch", 1024, 2.3))]
    got = {t["target"]: t["met"] for t in report.targets(rows + prim, torch.device("cpu"), busy=1)}
    assert not got["KTO step (no masking, 1 busy process): time <= 1.2x naive"]
    assert got["primitive (SmolLM2 head, 1 busy process): time <= 1.2x naive"]  # 1.15x


def test_quick_runs_do_not_grade_targets(capsys):
    from rich.console import Console

    target_rows = [{"target": "KTO step (no masking): time <= 1.25x naive", "measured": "2.00x", "met": False}]
    machine = {"name": "m", "device": "cpu"}
    report.print_report(Console(width=200), [], [], target_rows, {**machine, "quick": True})
    text = capsys.readouterr().out
    assert "not evaluated" in text and "missed" not in text
    report.print_report(Console(width=200), [], [], target_rows, machine)
    assert "missed" in capsys.readouterr().out


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def test_busy_cores_spin_pinned_for_the_block_and_stop():
    import psutil

    with measure.busy_cores(2) as cores:
        procs = [psutil.Process(pid) for pid in _children()]
        time.sleep(0.3)
        assert len(procs) == 2 and all(p.cpu_percent(interval=0.3) > 20 for p in procs)  # really spinning
        if hasattr(os, "sched_getaffinity"):
            assert sorted(c for p in procs for c in p.cpu_affinity()) == sorted(cores)  # one core each
    assert not _children()


def test_run_condition_stops_the_spinners_when_the_worker_fails(tmp_path, monkeypatch):
    """The spinners of a busy job run while its worker runs and are gone after it, whether the worker failed (an
    error result) or the harness itself was interrupted; each result records its condition."""
    seen = []

    def failing_worker(job, tmp, index, timeout, threads, on_progress):
        seen.append((len(_children()), threads))
        if index == 1:
            raise KeyboardInterrupt
        return [{"spec": {**job, "method": "naive"}, "points": [], "error": "worker exited with 1: boom"}]

    monkeypatch.setattr(run, "run_job", failing_worker)
    monkeypatch.setattr("fastkto.assets.idle_cores", lambda: 1)
    job = {"workload": "kto", "group": "g", "methods": ["naive"], "busy": 1}
    (got,) = run.run_condition(job, tmp_path, 0, 10, threads="auto")
    assert got["error"] and got["busy"] == 1 and len(got["busy_cores"]) == 1 and got["worker_threads"] == 1
    assert not _children()
    with pytest.raises(KeyboardInterrupt):
        run.run_condition({**job, "busy": 2}, tmp_path, 1, 10, threads=3)
    assert not _children()
    assert seen == [(1, 1), (2, 3)]  # the spinners ran beside the worker; "auto" counted the idle cores


def test_dry_run_plans_one_process_per_method_on_the_cpu(capsys):
    assert run.main(["--quick", "--dry-run", "--workloads", "primitive,kto"]) == 0
    args = run.parse_args(["--quick", "--workloads", "kto"])
    jobs, skipped = run.plan_jobs(args, torch.device("cpu"), workloads.PROFILES["quick"])
    assert all(len(j["methods"]) == 1 for j in jobs)
    assert {s["method"] for s in skipped} == {"fastkto-triton", "cce"}
    with pytest.raises(SystemExit):
        run.parse_args(["--workloads", "nope"])


def test_saved_runs_from_before_the_axes_still_summarize(capsys):
    # cpu-2core-busy1 was saved when --busy was one number for the whole run: its rows carry no busy or layout
    assert run.main(["--summary", str(ROOT / "benchmarks" / "results" / "cpu-2core-busy1")]) == 0
    text = capsys.readouterr().out
    assert "kto: smollm2-135m, no masking, 1 busy process" in text
    assert "primitive (SmolLM2 head, 1 busy process): time <= 1.2x naive" in text


def test_plan_has_layout_and_busy_axes(capsys):
    args = run.parse_args(["--quick", "--workloads", "e2e", "--layouts", "padded,packed", "--busy", "0,1",
                           "--profile", "--threads", "auto", "--batches", "2"])
    assert (args.layouts, args.busy, args.profile, args.threads) == (["padded", "packed"], [0, 1], 12, "auto")
    assert run.output_name(args, torch.device("cpu")).endswith("-quick-busy0-1")
    jobs, _ = run.plan_jobs(args, torch.device("cpu"), workloads.PROFILES["quick"])
    e2e = workloads.PROFILES["quick"]["e2e"]
    plan = [(j["loss"], j["layout"], j["methods"][0], j["busy"]) for j in jobs]
    # every (loss, layout, method) quiet then busy, one after the other (both conditions see the same host)
    assert plan == [(loss, layout, m, b) for loss in ("kto", "dpo") for layout in ("padded", "packed")
                    for m in ("naive", "fastkto") for b in (0, 1)]
    assert all(j["sizes"] == [0, 1] and j["batch"] == e2e["batch"][j["loss"]]
               and j["max_row"] == e2e["max_row"] and j["profile"] == 12 for j in jobs)
    assert run.parse_args([]).busy == [0] and run.parse_args([]).layouts == ["padded"]
    for bad in (["--busy", "-1"], ["--busy", "x"], ["--layouts", "padded,rolled"], ["--threads", "0"],
                ["--batches", "0"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


# ------------------------------------------------------------------------------------------------ memory model

def test_memory_model_arithmetic_and_coefficients(tmp_path):
    coef = memory_model.Coefficients(12.0, 64 * 2**20, "test")
    qwen = memory_model.MODELS["qwen2.5-32b"]
    naive_b, fast_b = memory_model.head_bytes(qwen, 1, 4096, 1.0, coef)
    assert naive_b == 12.0 * 4096 * 152064
    assert fast_b == 64 * 2**20 + 4096 * 5120 * 6  # fp32 hidden gradient + its bf16 cast
    def raw(method, extra):
        return {"spec": {"workload": "kto", "method": method}, "group": "g", "points": [
            {"size": n, "tokens": n, "scored": n, "V": 100, "D": 10, "peak_extra_bytes": extra(n)} for n in (8, 16)]}

    report = {"machine": {"name": "m", "device": "cpu"}, "profile": {"dtype": "float32"},
              "raw": [raw("naive", lambda n: 5 + 12 * n * 100), raw("fastkto-torch", lambda n: 1000 + 4 * n * 10)]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(report))
    got = memory_model.coefficients_from_results(path)
    assert abs(got.c_naive - 12.0) < 1e-9 and got.workspace == 1000
    assert memory_model.coefficients_from_results(None).source.startswith("analytic")
    assert memory_model.main(["--results", str(path), "--batch", "1", "--seq", "1024", "--json"]) == 0


def test_memory_model_gpu_column_is_the_plans_buffers():
    from fastkto.kernels import tiled

    qwen = memory_model.MODELS["qwen2.5-32b"]
    got = memory_model.gpu_path_bytes(qwen, 2, 4096, 1.0)
    n, v, ws = roofline.plan(roofline.Shape(8192, 5120, 152064), tiled.DEFAULT_WORKSPACE_MIB["cuda"])
    assert memory_model.DEFAULT_GPU_WORKSPACE_MIB == tiled.DEFAULT_WORKSPACE_MIB["cuda"]
    assert 0 < ws <= 128 * 2**20 and n >= 2048 and v >= 2048
    # the workspace (tile loop) and the bf16 hidden gradient (made after the loop) never coexist
    assert got == 8192 * 5120 * 4 + max(ws, 8192 * 5120 * 2) + 64 * 8192


# ------------------------------------------------------------------------------------------------ roofline

def test_sweep_starts_with_the_shipped_configurations():
    """The sweep's first configuration of each kernel is what the dispatch launches (its rows are marked default
    and every other row is compared with them); a capped row carries a cap below ptxas' 255."""
    from fastkto.kernels import fused_logprob as fl

    for kernel, cfgs in roofline.SWEEP_CONFIGS.items():
        assert fl.KernelConfig(*cfgs[0]) == fl.gpu_configs()[(kernel, "16")], kernel
        assert len(set(cfgs)) == len(cfgs), f"{kernel}: a configuration is listed twice"
        assert all(len(c) == 5 or (len(c) == 6 and 0 < c[5] < 255) for c in cfgs), cfgs


def test_roofline_rows_follow_the_plan_and_meet_the_targets():
    out = roofline.rows(roofline.SHAPES, 128)
    assert all(set(r) == {"scenario", "shape", "step", "flops", "hbm_bytes", "predicted_ms", "maker"} for r in out)
    targets = {"16384,2048,248320": 141, "8192,2304,256000": 82, "8192,4096,128256": 73}  # 60 % of 790 on 8NDV
    assert {r["shape"] for r in out} == set(targets)
    assert {r["scenario"] for r in out} == set(roofline.SCENARIOS)
    for scenario in roofline.SCENARIOS:
        for key, limit in targets.items():
            mine = [r for r in out if r["shape"] == key and r["scenario"] == scenario]
            total = [r for r in mine if r["step"] == "total"]
            assert len(total) == 1 and mine[-1] is total[0]
            n, d, v = (int(x) for x in key.split(","))
            assert total[0]["flops"] == 8 * n * d * v  # one recompute: forward 2 + recompute 2 + two GEMMs 2 + 2
            parts = [r for r in mine if r["step"] != "total"]
            assert abs(sum(r["predicted_ms"] for r in parts) - total[0]["predicted_ms"]) < 1e-9
            assert sum(r["hbm_bytes"] for r in parts) == total[0]["hbm_bytes"]
            if scenario != "pessimistic":  # the pessimistic scenario is a bound, not a promise
                assert total[0]["predicted_ms"] <= limit, (scenario, key, total[0]["predicted_ms"])
            # each step at least its roofline at the peak rates
            for r in parts:
                assert r["predicted_ms"] >= 1e3 * max(r["flops"] / roofline.TFLOPS, r["hbm_bytes"] / roofline.HBM)


def test_roofline_scenarios_match_a_hand_computation():
    # M = N = 512, D = 512, V = 2048, no soft-cap: one 512 x 2048 tile (tn = tv = 1: dW written straight into the
    # bf16 gradient), 4 forward splits. Every number below is worked out by hand from the rate table's values.
    shape = roofline.Shape(512, 512, 2048)
    assert roofline.plan(shape, 128)[:2] == (512, 2048)
    flops = 2.0 * 512 * 512 * 2048
    for scenario in roofline.SCENARIOS:
        r = roofline.scenario_rates(scenario)
        hbm = r.hbm_tbs * 1e12
        got = {s["step"]: s for s in roofline.steps(shape, 128, scenario)}
        assert all(s["scenario"] == scenario for s in got.values())

        def triton(main, epi_us, programs_fill, tiles, r=r):
            # main loop under the L2 roof (64 FLOP/B of a 128 x 128 x 64 tile), epilogue per tile on 132 SMs
            rate = min(main * 790e12, 64 * r.l2_tbs * 1e12) if r.l2_tbs else main * 790e12
            return 1e3 * (flops / rate + tiles * epi_us * 1e-6 / 132) / programs_fill

        # forward: 4 token tiles x 4 splits = 16 programs on 132 SMs at 1 CTA each (one wave, 16/132 full); 4 x 16
        # tiles of 128 x 128; the merge of 4 splits is 30 small kernels; bytes H once, W once (1 wave of 33
        # resident token tiles), 12 bytes per token and split
        fill = {0: 1.0, 1: 16 / 132, 2: 16 / 132}[r.triton_waves]
        fwd_bytes = 512 * 512 * 2 + 2048 * 512 * 2 + 12 * 512 * 4
        expect = max(triton(r.fwd_main, r.fwd_epilogue_us, fill, 64), 1e3 * fwd_bytes / hbm) + 31e-3 * r.launch_us
        assert got["forward (Triton)"]["hbm_bytes"] == fwd_bytes
        assert got["forward (Triton)"]["predicted_ms"] == pytest.approx(expect, rel=1e-12)

        # dz: one launch of 4 x 16 = 64 programs at 2 CTAs per SM: 64/132 of the SMs (waves of one per SM) or
        # 64/264 of the CTA slots; bytes H, W once each, dz written in bf16
        fill = {0: 1.0, 1: 64 / 132, 2: 64 / 264}[r.triton_waves]
        dz_bytes = 512 * 512 * 2 + 2048 * 512 * 2 + 512 * 2048 * 2
        expect = max(triton(r.dz_main, r.dz_epilogue_us, fill, 64), 1e3 * dz_bytes / hbm) + 1e-3 * r.launch_us
        assert got["recompute dz (Triton)"]["hbm_bytes"] == dz_bytes
        assert got["recompute dz (Triton)"]["predicted_ms"] == pytest.approx(expect, rel=1e-12)

        # the GEMMs: output tiles 128x128 / 128x256 / 256x128 on 132 SMs; C bytes exposed at HBM speed
        # dH: 512 x 512 output, 16 / 8 / 8 tiles; its first (only) vocabulary chunk writes the fp32 gradient
        # dW: 2048 x 512 output, 64 / 32 / 32 tiles; the direct bf16 write
        for step, tiles, c_bytes, operands in (
                ("dH += dz @ W (cuBLAS)", (16, 8, 8), 4 * 512 * 512, 512 * 2048 * 2 + 2048 * 512 * 2),
                ("dW += dz.T @ H (cuBLAS)", (64, 32, 32), 2 * 2048 * 512, 512 * 2048 * 2 + 512 * 512 * 2)):
            fill = {"none": 1.0, "best": max(tiles) / 132, "worst": min(tiles) / 132}[r.cublas_fill]
            compute = 1e3 * flops / (r.cublas * 790e12 * fill)
            exposed = r.rmw_exposed * c_bytes
            expect = (max(compute, 1e3 * (operands + c_bytes - exposed) / hbm) + 1e3 * exposed / hbm
                      + 1e-3 * r.launch_us)
            assert got[step]["hbm_bytes"] == operands + c_bytes
            assert got[step]["predicted_ms"] == pytest.approx(expect, rel=1e-12), (scenario, step)

        # casts: only dH's (read fp32, write bf16), one kernel
        assert got["epilogue (casts)"]["hbm_bytes"] == 6 * 512 * 512
        assert got["epilogue (casts)"]["predicted_ms"] == pytest.approx(
            1e3 * 6 * 512 * 512 / hbm + 1e-3 * r.launch_us, rel=1e-12)
        steps_ms = sum(s["predicted_ms"] for k, s in got.items() if k not in ("sustained (whole call)", "total"))
        assert got["sustained (whole call)"]["predicted_ms"] == pytest.approx(r.sustained * steps_ms, rel=1e-12)
        assert got["total"]["predicted_ms"] == pytest.approx((1 + r.sustained) * steps_ms, rel=1e-12)
    # the optimistic scenario is the model as first written: max(flops / rate, bytes / 4.2 TB/s) per step
    opt = {s["step"]: s["predicted_ms"] for s in roofline.steps(shape, 128, "optimistic")}
    assert opt["forward (Triton)"] == pytest.approx(1e3 * flops / (0.60 * 790e12))
    assert opt["dH += dz @ W (cuBLAS)"] == pytest.approx(1e3 * flops / (0.80 * 790e12))


def test_roofline_central_explains_the_h200_and_pessimistic_bounds_it():
    # run 2 on the H200 (benchmarks/results/h200/run2): every step timed one at a time and the whole call
    measured = roofline.measured_steps(ROOT / "benchmarks" / "results" / "h200" / "run2" / "roofline_measured.json")
    for shape in roofline.SHAPES:
        got = measured[shape.key]
        by = {sc: {s["step"]: s["predicted_ms"] for s in roofline.steps(shape, 128, sc)} for sc in roofline.SCENARIOS}
        for step in ("forward (Triton)", "recompute dz (Triton)", "dH += dz @ W (cuBLAS)", "dW += dz.T @ H (cuBLAS)"):
            assert abs(by["central"][step] / got[step] - 1) < 0.05, (shape.key, step, by["central"][step], got[step])
            assert by["pessimistic"][step] > got[step], (shape.key, step)
        # the casts' bucket is < 0.1 ms (at one token chunk only the event marks' own gaps are in it)
        assert abs(by["central"]["epilogue (casts)"] - got["epilogue (casts)"]) < 0.1
        assert abs(by["central"]["total"] / got["total"] - 1) < 0.03, (shape.key, by["central"]["total"])
        assert by["pessimistic"]["total"] > 1.1 * got["total"]
        # the peak: outside the budget + max(workspace, bf16 dH cast), within 2 MiB of what the H200 allocated
        mem = roofline.peak_bytes(shape, 128)
        assert mem["peak"] == mem["weight_grad"] + mem["dh_fp32"] + mem["per_token"] + max(mem["workspace"],
                                                                                            mem["dh_cast"])
    report = json.loads((ROOT / "benchmarks/results/h200/run2/roofline_measured.json").read_text())
    for r in report["measured"]:
        shape = next(s for s in roofline.SHAPES if s.key == r["shape"])
        peak_mib = roofline.peak_bytes(shape, 128)["peak"] / 2**20
        assert abs(peak_mib - r["methods"]["fastkto-triton"]["random"]["peak_mib"]) < 2, (shape.key, peak_mib)


def test_roofline_fallback_gemm_path_and_masked_calls():
    gemma = roofline.SHAPES[1]
    fused = {s["step"]: s for s in roofline.steps(gemma, 128, "central")}
    fallback = {s["step"]: s for s in roofline.steps(gemma, 128, "central", gemm_path="fallback")}
    # without addmm(..., out_dtype=fp32): a prod buffer in the workspace (smaller tiles), and each accumulating
    # GEMM's product written in fp32, then read with the accumulator by a separate add_: more bytes, more time
    n_f, v_f, _ = roofline.plan(gemma, 128)
    n_b, v_b, _ = roofline.plan(gemma, 128, "fallback")
    assert n_b * v_b < n_f * v_f
    for step in ("dH += dz @ W (cuBLAS)", "dW += dz.T @ H (cuBLAS)"):
        assert fallback[step]["hbm_bytes"] > fused[step]["hbm_bytes"]
        assert fallback[step]["predicted_ms"] > fused[step]["predicted_ms"]
        assert "add_" in fallback[step]["note"]
    assert fallback["total"]["predicted_ms"] > fused["total"]["predicted_ms"]
    with pytest.raises(ValueError, match="gemm_path"):
        roofline.plan(gemma, 128, "cublaslt")
    # a masked call: 2048 of 8192 rows scored; the plan has the gathered-H buffer, the flops follow M, and the
    # epilogue row has the gather and the scatter of dH into the zeroed (N, D) gradient
    import dataclasses

    masked = dataclasses.replace(gemma, scored=2048)
    got = {s["step"]: s for s in roofline.steps(masked, 128, "central")}
    assert got["total"]["flops"] == 8 * 2048 * 2304 * 256000
    n, v, ws = roofline.plan(masked, 128)
    assert n == 2048 and ws >= 2048 * 2304 * 2  # the gathered rows' buffer
    assert got["epilogue (casts)"]["hbm_bytes"] == 2 * 8192 * 2304 + 10 * 2048 * 2304 + 4 * 2048 * 2304
    mem = roofline.peak_bytes(masked, 128)
    assert mem["dh_fp32"] == 4 * 2048 * 2304 and mem["dh_cast"] == 2 * 8192 * 2304 + 2 * 2048 * 2304
    with pytest.raises(ValueError, match="scenario"):
        roofline.steps(gemma, 128, "hopeful")


def test_roofline_accumulator_traffic_falls_with_the_tile():
    # the model reads the plan: a budget that shrinks the tiles raises the accumulators' bytes
    shape = roofline.SHAPES[2]
    big = {s["step"]: s["hbm_bytes"] for s in roofline.steps(shape, 128)}
    small = {s["step"]: s["hbm_bytes"] for s in roofline.steps(shape, 8)}
    assert small["dH += dz @ W (cuBLAS)"] > 2 * big["dH += dz @ W (cuBLAS)"]
    assert small["dW += dz.T @ H (cuBLAS)"] > big["dW += dz.T @ H (cuBLAS)"]


def test_roofline_cli(capsys):
    assert roofline.main(["--json", "--shape", "1000,512,32000", "--softcap", "30"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in got][-1] == "total" and {r["shape"] for r in got} == {"1000,512,32000"}
    assert {r["scenario"] for r in got} == set(roofline.SCENARIOS)
    assert roofline.main(["--json", "--scenario", "central", "--shape", "1000,512,32000", "--scored", "500",
                          "--gemm-path", "fallback"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {r["scenario"] for r in got} == {"central"} and got[-1]["flops"] == 8 * 500 * 512 * 32000
    assert roofline.main([]) == 0
    text = capsys.readouterr().out
    assert "Llama-3-8B" in text and "target <= 73 ms" in text and "pessimistic" in text
    assert roofline.main(["--rates"]) == 0
    assert "l2_tbs" in capsys.readouterr().out
    assert roofline.main(["--compare", str(ROOT / "benchmarks/results/h200/run2/roofline_measured.json")]) == 0
    assert "central/measured" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        roofline.main(["--shape", "1,2"])
    with pytest.raises(SystemExit):
        roofline.main(["--shape", "100,64,1000", "--scored", "101"])


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton path under the interpreter")
def test_roofline_measurement_runs_end_to_end_on_the_cpu(capsys):
    # the GPU run's code path on a tiny shape: every step marked and timed, the methods, the bitwise repeat and the
    # report (on the CPU: wall time, the Triton kernels interpreted, the CUDA-only peers skipped with a reason).
    # 20 tokens: 2 of the interpreter's 16-row tiles, the last ragged (its time grows with the tiles)
    shape = roofline.Shape(20, 32, 300, 20.0, "tiny")
    got = roofline.measure(shape, 0.05, ["fastkto-triton", "fastkto-torch", "naive", "trl", "cce"],
                           device="cpu", dtype=torch.float32, repeats=1, input_kinds=("random",))
    assert set(got["steps"]) == {s["step"] for s in roofline.steps(shape, 0.05)} - {"total", "sustained (whole call)"}
    assert all(got["steps"][k] > 0 for k in ("forward (Triton)", "recompute dz (Triton)", "dH += dz @ W (cuBLAS)",
                                             "dW += dz.T @ H (cuBLAS)"))
    assert set(got["methods"]) == {"fastkto-triton", "fastkto-torch", "naive", "trl"}
    assert all(m["random"]["ms"] > 0 and m["random"]["peak_mib"] > 0 for m in got["methods"].values())
    assert got["errors"]["cce"].startswith("skipped") and got["bitwise_repeat"] is True
    roofline._print_measured([shape], [got], 0.05)
    assert "recompute dz (Triton)" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded on a shared 2-core machine (30x here beside another job); restored
    after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_smollm2(monkeypatch):
    """benchmarks.e2e without the GGUF (the GPU image's path: random weights, random ids of the real rows'
    lengths), on a 2-layer, 64-wide SmolLM2: the same code path at a fraction of the cost."""
    from benchmarks import e2e

    monkeypatch.setattr(e2e, "find_smollm2_gguf", lambda: None)
    monkeypatch.setattr(e2e, "SMOLLM2_135M_CONFIG", {
        **e2e.SMOLLM2_135M_CONFIG, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512})
    return e2e


def _e2e_spec(**kw) -> dict:
    return {"workload": "e2e", "shape": "smollm2-135m", "masking": "real", "method": "fastkto", "loss": "kto",
            "layout": "padded", "batch": 4, "max_row": 96, "sizes": [0], "seed": 0, "dtype": "float32",
            "device": "cpu", **kw}


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_e2e_layouts_compute_the_real_tokens_and_agree_on_the_gradients(loss, monkeypatch, one_thread):
    """The SmolLM2 step in every layout with both heads, on the same examples: the packed layouts compute only the
    real tokens and score the same ones, and every (layout, head) gives the model the same gradients."""
    e2e = _tiny_smollm2(monkeypatch)
    state: dict = {}
    info, grads = {}, {}
    for layout in e2e.LAYOUTS:
        for method in ("naive", "fastkto"):
            point = e2e.e2e_point(_e2e_spec(loss=loss, layout=layout, method=method, batch=4 if loss == "kto"
                                            else 2), 0, state)
            point.run()
            grads[layout, method] = [p.grad.clone() for p in point.leaves]
            measure.clear_grads(point.leaves)
            info[layout] = point.info
    pad, pk, dense = info["padded"], info["packed"], info["packed_dense"]
    assert "random weights" in pad["model"] and pk["shape"][0] == 1 and pk["sequences"] == pad["sequences"] == 4
    assert pk["positions"] == pk["real_tokens"] == pad["real_tokens"] < pad["positions"]
    assert dense["positions"] == pk["positions"] and pk["scored_tokens"] == pad["scored_tokens"] > 0
    # float32 throughout: the layouts and heads differ only in summation order (attention per row or over the
    # padded batch, logits materialized or tiled), ~1e-6 relative on these O(1e-2) gradients
    first = grads["padded", "naive"]
    for key, got in grads.items():
        for a, b in zip(first, got):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-3, msg=str(key))
    with pytest.raises(ValueError, match="layout must be"):
        e2e.e2e_point(_e2e_spec(layout="rolled"), 0, state)


def test_worker_measures_the_e2e_step_and_profiles_it(monkeypatch, one_thread):
    from benchmarks import worker

    _tiny_smollm2(monkeypatch)
    monkeypatch.setattr(worker, "lower_mmap_threshold", lambda: None)  # leave this process's malloc as it is
    spec = _e2e_spec(layout="packed", method="naive", sizes=[0, 1], warmup=0, repeats=1, profile=5, check=None)
    result = worker.run_spec(spec, lambda r: None)
    assert result["error"] is None, result.get("traceback")
    assert [p["batch_index"] for p in result["points"]] == [0, 1]
    assert all(p["time_s"] > 0 and p["alloc_peak_bytes"] > 0 and p["tokens"] == p["real_tokens"]
               for p in result["points"])
    ops = result["profile"]["ops"]
    assert result["profile"]["size"] == 1 and 0 < len(ops) <= 5 and all(o["op"].startswith("aten::") for o in ops)
    assert ops == sorted(ops, key=lambda o: -o["self_ms"]) and all(o["ms_per_call"] > 0 for o in ops)


def test_report_gives_packed_and_busy_ratios_profiles_and_targets(capsys):
    from rich.console import Console

    def result(method, layout, busy, times, tokens, profile=None):
        points = [{"size": i, "tokens": n, "scored": 10, "B": 8, "time_s": t, "alloc_peak_bytes": n,
                   "peak_bytes": 2 * n, "peak_extra_bytes": n} for i, (t, n) in enumerate(zip(times, tokens))]
        return {"spec": {"workload": "e2e", "method": method, "loss": "kto", "layout": layout, "masking": "real"},
                "group": "SmolLM2-135M-Instruct, KTO, hh-rlhf", "busy": busy, "points": points, "check": None,
                "error": None, "profile": profile and {"size": 1, "ops": profile}}

    def ops(ms):
        return [{"op": "aten::mm", "calls": 4, "self_ms": 4 * ms, "ms_per_call": ms}]

    results = [result("fastkto", "padded", 0, [10.0, 20.0], [1000, 2000], ops(2.0)),
               result("fastkto", "packed", 0, [5.0, 8.0], [500, 800]),
               result("naive", "padded", 0, [20.0, 25.0], [1000, 2000]),
               result("fastkto", "padded", 1, [15.0, 30.0], [1000, 2000], ops(5.0)),
               result("fastkto", "packed", 1, [6.0, 9.0], [500, 800]),
               result("naive", "padded", 1, [20.0, 30.0], [1000, 2000])]
    rows = report.summarize(results)
    layout = {s["busy"]: s for s in report.paired_ratios(rows, "layout", "padded")}
    assert set(layout) == {0, 1} and layout[0]["time"] == [0.5, 0.4] and layout[0]["time_median"] == 0.45
    assert layout[0]["tokens"] == layout[0]["tensor_peak"] == layout[0]["rss_peak"] == [0.5, 0.4]
    busy = {(s["layout"], s["method"]): s for s in report.paired_ratios(rows, "busy", 0)}
    assert set(busy) == {("padded", "fastkto"), ("packed", "fastkto"), ("padded", "naive")}
    assert busy["padded", "fastkto"]["time"] == [1.5, 1.5]
    assert busy["packed", "fastkto"]["time_median"] == pytest.approx((6 / 5 + 9 / 8) / 2)
    # fastkto against naive, quiet then busy: 0.5, 0.8 -> 0.75, 1.0
    assert busy["padded", "fastkto"]["base_x_naive"] == [0.5, 0.8] and busy["padded", "fastkto"]["x_naive"] == \
        [0.75, 1.0]
    got = {t["target"]: t["met"] for t in report.all_targets(rows, torch.device("cpu"))}
    assert got["SmolLM2 KTO step, hh-rlhf batches of 8, quiet: packed time <= 0.6x padded"]
    assert got["SmolLM2 KTO step, hh-rlhf batches of 8, 1 busy: packed peak memory <= padded (tensor-level and RSS)"]
    machine = {"name": "m", "device": "cpu"}
    report.print_report(Console(width=250), rows, [], [], machine)
    text = capsys.readouterr().out
    assert "packed / padded" in text and "busy / quiet" in text and "0.45x (0.40-0.50)" in text
    assert "operations of one pass" in text and "2.5" in text  # aten::mm 2.0 -> 5.0 ms per call
    md = report.markdown_tables(rows)
    assert "**e2e: SmolLM2-135M-Instruct, KTO, hh-rlhf, packed, 1 busy process**" in md and "**busy / quiet**" in md


# ------------------------------------------------------------------------------------------------ the GPU check's
# failure handling, on the CPU: the first GPU run must not be the first run of these paths


@pytest.mark.skipif(not _has("triton"), reason="the measurement plans with the Triton tile maker")
@pytest.mark.parametrize("peer_fault", ["crash", "hang"])
def test_measure_records_each_failure_and_goes_on(tmp_path, monkeypatch, capsys, peer_fault):
    # a step that raises (forward: the backward steps that need it are left out), a failing bitwise repeat, a
    # register read that raises, and a peer whose process crashes or hangs past its limit: each is recorded in
    # measured.json, everything else is measured, and the exit status says "partial"
    if not _has("trl.kernels"):
        pytest.skip("needs trl (the peer that crashes)")
    monkeypatch.setenv(roofline.FAULT_ENV, f"forward,bitwise_repeat,registers,method:trl={peer_fault}")
    out = tmp_path / "roofline"
    # the crashing peer must get through its start and imports first; the hanging one is waited for the whole limit
    timeout = "3" if peer_fault == "hang" else "8"
    rc = roofline.main(["--measure", "--device", "cpu", "--dtype", "float32", "--shape", "40,32,300",
                        "--repeats", "1", "--methods", "naive,trl", "--peer-timeout", timeout, "--out", str(out)])
    assert rc == 3
    report = json.loads((out / "measured.json").read_text())
    assert report["status"] == "partial"
    assert report["environment"]["fp32_gemm_support"]["device"] == "cpu"
    (r,) = report["measured"]
    assert set(r["errors"]) == {"forward", "bitwise_repeat", "trl"}
    assert "injected fault at forward" in r["errors"]["forward"]
    assert ("timeout" if peer_fault == "hang" else "ended with 139") in r["errors"]["trl"]
    assert "injected fault at registers" in report["errors"]["registers"]
    assert set(r["methods"]["naive"]) == {"random", "realistic"}  # both kinds of inputs measured
    assert r["plan"]["gemm_path"].startswith("fallback") and r["plan"]["tile"] == [40, 300]
    assert abs(r["realistic_inputs"]["entropy_nats"] - roofline.REAL_ENTROPY) < 0.05
    assert {"plan", "matmul_floor", "realistic"} <= set(r["done"])
    assert "status: partial" in capsys.readouterr().out


def test_realistic_inputs_match_the_entropy_random_ones_do_not():
    shape = roofline.Shape(256, 64, 4096, None)
    h, w, labels, grad, stats = roofline.realistic_inputs(shape, "cpu", torch.float32, entropy=2.5)
    assert abs(stats["entropy_nats"] - 2.5) < 0.05 and labels.min() >= 0 and labels.max() < shape.V
    rh, rw, *_ = roofline._inputs(shape, "cpu", torch.float32)
    assert roofline._entropy(rh, rw, None) > 6.0  # near-uniform over 4096: ln V - 2 = 6.3
    # labels drawn from the model: their mean log-prob is far above the uniform -ln V
    logp = torch.log_softmax(h.detach() @ w.detach().T, -1).gather(1, labels[:, None])
    assert logp.mean() > -5.0


def test_realistic_inputs_vary_the_likely_tokens_by_position():
    """A real model's likely tokens change with the context, so few 128 x 128 probability blocks lie entirely below
    2^-12 (SmolLM2 on hh-rlhf: 4.9%); the same entropy with the same likely tokens everywhere (spread 0, the first
    H200 run's inputs) leaves half of them below here, and Cut Cross-Entropy's filter would skip those."""
    shape = roofline.Shape(256, 64, 16384, None)
    *_, context = roofline.realistic_inputs(shape, "cpu", torch.float32)
    *_, frequency_only = roofline.realistic_inputs(shape, "cpu", torch.float32, spread=0.0)
    assert abs(context["entropy_nats"] - roofline.REAL_ENTROPY) < 0.05
    assert context["blocks_below_2^-12"] < 0.1 < 0.4 < frequency_only["blocks_below_2^-12"]


def _gpu_check(tmp_path, env):
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                          env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True,
                          timeout=300)
    return proc, out


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
@pytest.mark.skipif(not _has("triton"), reason="the measurement plans with the Triton tile maker")
def test_gpu_check_goes_on_past_a_failing_and_a_hanging_step(tmp_path):
    # the measurement with a raising step, a test step that hangs past its limit and a step that fails: each is
    # recorded in summary.txt, the later steps still run, and the exit status is 3 ("partial")
    proc, out = _gpu_check(tmp_path, {
        "GPU_CHECK_ONLY": "roofline,device-tests,benchmark", "ROOF_METHODS": "naive",
        roofline.FAULT_ENV: "forward,bitwise_repeat", "GPU_CHECK_FAULT": "step:device-tests=hang,step:benchmark",
        "T_DEVICE": "6"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    steps = dict(line.split("\t")[:2] for line in summary.splitlines() if line.count("\t") == 2)
    assert steps["roofline"] == "3" and steps["device-tests"] == "124" and steps["benchmark"] == "1"
    assert steps["sweep"] == "skipped" and steps["compile-checks"] == "skipped"
    assert summary.strip().endswith("RESULT: partial (roofline device-tests benchmark)")
    assert "missing 40,32,300/forward" in summary
    report = json.loads((out / "roofline" / "measured.json").read_text())
    assert set(report["measured"][0]["methods"]["naive"]) == {"random", "realistic"}
    assert (out / "gpu_check_all.tar.gz").exists() and (out / "env.txt").exists()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_reports_complete_when_every_step_passes(tmp_path):
    proc, out = _gpu_check(tmp_path, {"GPU_CHECK_ONLY": "benchmark"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "summary.txt").read_text().strip().endswith("RESULT: complete")


def test_roofline_epilogue_path_by_hand():
    # the cuBLAS-and-epilogue model (not yet timed): per block, a logits GEMM writing 4 bytes per logit and an
    # epilogue moving 4 (fold) or 6 (dz) bytes per logit at HBM speed; its gradient GEMMs are the fused model's
    # with this path's tiles
    shape = roofline.Shape(4096, 1024, 32768, None)
    n, v, ws = roofline.epilogue_plan(shape, 128)
    assert 0 < ws <= 128 * 2**20 and n <= shape.M and v <= shape.V
    by = {s["step"]: s for s in roofline.epilogue_steps(shape, 128, "central")}
    r = roofline.scenario_rates("central")
    logits = shape.M * shape.V
    assert by["fold epilogue (Triton)"]["hbm_bytes"] == 4 * logits
    assert by["dz epilogue (Triton)"]["hbm_bytes"] == 6 * logits
    blocks = -(-shape.M // n) * -(-shape.V // v)
    want = 1e3 * 4 * logits / (r.hbm_tbs * 1e12) + 1e-3 * blocks * r.launch_us
    assert by["fold epilogue (Triton)"]["predicted_ms"] == pytest.approx(want)
    fused = {s["step"]: s for s in roofline.steps(shape, 128, "central", tile=(n, v))}
    assert by["dH += dz @ W (cuBLAS)"]["predicted_ms"] == fused["dH += dz @ W (cuBLAS)"]["predicted_ms"]
    total = sum(s["predicted_ms"] for name, s in by.items() if name != "total")
    assert by["total"]["predicted_ms"] == pytest.approx(total)
    assert roofline.main(["--json", "--tile-maker", "epilogue", "--shape", "1000,512,32000"]) == 0
