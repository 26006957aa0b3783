"""The benchmark harness: fastkto against the naive head and the peers, on whatever machine this runs.

    python -m benchmarks.run                      # the full run for this machine (CPU: about 10-15 minutes)
    python -m benchmarks.run --quick              # tiny shapes, every workload end to end (a few minutes)
    python -m benchmarks.run --workloads kto,dpo --out /tmp/bench
    python -m benchmarks.run --workloads e2e --methods fastkto --layouts padded,packed    # packed vs padded steps
    python -m benchmarks.run --workloads primitive --shapes smollm2-135m --busy 0,1 --profile  # a busy core

Workloads (``benchmarks.workloads``, ``benchmarks.e2e``): the primitive on four real LM heads, a whole KTO step
and a whole DPO step without masking and with the masking of real hh-rlhf batches, and KTO / DPO steps of
SmolLM2-135M-Instruct on real hh-rlhf batches. Methods: naive (logits materialized), fastkto (torch backend;
triton on CUDA), TRL's chunked head, Liger-Kernel's fused KTO / DPO losses, Cut Cross-Entropy (CUDA); a method
that cannot run here is skipped with the reason printed.

Axes beside workload, shape, masking and method: ``--layouts`` (the SmolLM2 steps' batches padded, packed with
varlen attention, or packed under a dense block-diagonal mask; the report gives each packed layout's ratios to
padded) and ``--busy`` (N processes spinning, pinned to a core each, beside every worker; ``--busy 0,1`` measures
each job quiet, then busy, and the report gives the busy / quiet ratios). ``--profile`` adds each job's top
operations (one more pass under ``torch.profiler``), shown quiet against busy.

Every (workload, shape, masking, layout, method, busy) runs in its own worker process on the CPU
(``benchmarks.worker``); on CUDA one process per (workload, shape, masking, layout, busy). Results: a table in the
terminal, ``results.json`` and PNG plots (memory and time against tokens, one line per method) in ``--out``
(default ``benchmarks/results/<machine>/``, ``<machine>-quick`` for ``--quick``, ``-busyN`` with spinners).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .e2e import LAYOUTS
from .measure import busy_cores
from .peers import skip_reason
from .report import MASKING, all_targets, fmt_bytes, print_report, print_summary, summarize, write_plots
from .workloads import METHODS, SHAPES, profile_for

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("primitive", "kto", "dpo", "e2e")


# ------------------------------------------------------------------------------------------------ machine

def machine_name(device: torch.device) -> str:
    """A short name for the results folder: "h200", "a100-80gb", "cpu-2core"."""
    if device.type == "cuda":
        if not torch.cuda.is_available():  # planning a CUDA run elsewhere (--dry-run)
            return "cuda"
        name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"
    return f"cpu-{os.cpu_count()}core"


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """Measured bf16 matmul rate (n x n x n, CUDA events, after 3 warm-ups): the GPU's practical ceiling."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, ours included), or None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_summary(samples: list[float | None]) -> dict | None:
    """{mean, min, max, samples} of the load averages sampled during a run, None without any."""
    got = [x for x in samples if x is not None]
    if not got:
        return None
    return {"mean": sum(got) / len(got), "min": min(got), "max": max(got), "samples": len(got)}


def machine_info(device: torch.device) -> dict:
    import fastkto

    info = {"name": machine_name(device), "device": str(device), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "fastkto": fastkto.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for pkg in ("triton", "trl", "liger_kernel", "cut_cross_entropy", "transformers"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            info[pkg] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["bf16_matmul_tflops"] = matmul_tflops(device)
    return info


# ------------------------------------------------------------------------------------------------ jobs

def plan_jobs(args, device: torch.device, profile: dict) -> tuple[list[dict], list[dict]]:
    """(jobs to run, skipped methods with their reasons). A job is a worker spec."""
    base = {"dtype": args.dtype or profile["dtype"], "device": str(device), "seed": args.seed, "allocator": True,
            "profile": args.profile or None}
    jobs: list[dict] = []
    skipped: list[dict] = []
    for workload, group, spec in _workload_groups(args, profile):
        runnable = _runnable_methods(args, device, profile, workload, group, skipped)
        if not runnable:
            continue
        per_process = [[m] for m in runnable] if (device.type == "cpu" or args.isolate) else [runnable]
        # each job quiet and busy in turn, so that both conditions see the same drift of the host
        for methods in per_process:
            for busy in args.busy:
                jobs.append({**base, **_timing(args, profile, workload), "workload": workload, "group": group,
                             "methods": methods, "busy": busy, **spec})
    return jobs, skipped


def _workload_groups(args, profile: dict):
    """(workload, group, spec) of every group of points the run measures: a primitive shape, a step workload's
    masking, the SmolLM2 step's loss and layout (``--layouts``)."""
    check = None if args.no_check else profile["check"]
    for workload in args.workloads:
        if workload == "primitive":
            for shape, sizes in profile["primitive"].items():
                if not args.shapes or shape in args.shapes:
                    yield workload, shape, dict(shape=shape, sizes=sizes, batch=None, masking="none", check=check)
        elif workload in ("kto", "dpo"):
            steps = profile["steps"]
            for masking in ("none", "real"):
                yield workload, f"{steps['shape']}, {MASKING[masking]}", dict(
                    shape=steps["shape"], sizes=steps["T"], batch=steps["batch"], masking=masking, check=check)
        elif workload == "e2e":
            e2e = profile["e2e"]
            for loss in e2e["losses"]:
                for layout in args.layouts:
                    yield workload, f"SmolLM2-135M-Instruct, {loss.upper()}, hh-rlhf", dict(
                        shape="smollm2-135m", sizes=list(range(args.batches or e2e["batches"])),
                        batch=e2e["batch"][loss], masking="real", loss=loss, layout=layout, max_row=e2e["max_row"],
                        check=None)


def _runnable_methods(args, device, profile: dict, workload: str, group: str, skipped: list[dict]) -> list[str]:
    """The methods of ``workload`` asked for (``--methods``; "fastkto" names every fastkto backend) that can run
    here; the others that were asked for are appended to ``skipped`` with the reason."""
    wanted = set(args.methods.split(",")) if args.methods else None
    runnable = []
    for m in METHODS[workload]:
        if m in profile.get("skip", {}).get(workload, ()):
            continue
        if wanted is not None and m not in wanted and not (m.startswith("fastkto") and "fastkto" in wanted):
            continue
        reason = skip_reason(m, device)
        if reason:
            skipped.append({"workload": workload, "group": group, "method": m, "reason": reason})
        else:
            runnable.append(m)
    return runnable


def _timing(args, profile: dict, workload: str) -> dict:
    """The profile's warm-up and repeats of ``workload``, with ``--warmup`` / ``--repeats`` on top."""
    t = dict(profile["timing"]["steps" if workload in ("kto", "dpo") else workload])
    if args.warmup is not None:
        t["warmup"] = args.warmup
    if args.repeats is not None:
        t["repeats"] = args.repeats
    return t


def job_label(job: dict) -> str:
    """The job in a line: workload, group, layout, methods, busy processes."""
    layout = f" {job['layout']}" if job.get("layout") else ""
    busy = f" [{job['busy']} busy]" if job.get("busy") else ""
    return f"{job['workload']} {job['group']}{layout} {','.join(job['methods'])}{busy}"


def job_progress(out_path: Path, job: dict) -> str:
    """What a running worker has written so far: "method 2/3 sizes timed" (its OUT.json after each stage)."""
    try:
        results = json.loads(out_path.read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return ""
    if not results:
        return ""
    last = results[-1]
    done = sum(1 for p in last.get("points", []) if "time_s" in p)
    mem = sum(1 for p in last.get("points", []) if "peak_extra_bytes" in p)
    stage = "memory" if mem else "timed"
    return (f"{last['spec']['method']} ({len(results)}/{len(job['methods'])}): "
            f"{mem if mem else done}/{len(job['sizes'])} sizes {stage}")


def run_job(job: dict, tmp: Path, index: int, timeout: float, threads: int | None = None,
            on_progress=None) -> list[dict]:
    spec_path, out_path = tmp / f"spec{index}.json", tmp / f"out{index}.json"
    spec_path.write_text(json.dumps(job))
    log_path = tmp / f"log{index}.txt"
    with open(log_path, "w") as log:
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", str(spec_path), str(out_path)],
                                cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        start = time.perf_counter()
        rc = None
        while rc is None:
            try:
                rc = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start > timeout:
                    proc.kill()
                    proc.wait()
                    rc = "timeout"
                elif on_progress is not None:
                    on_progress(job_progress(out_path, job))
    results = json.loads(out_path.read_text()) if out_path.exists() else []
    done = {r["spec"]["method"] for r in results}
    for m in job["methods"]:
        if m not in done:  # the worker died before writing this method
            tail = log_path.read_text()[-2000:]
            results.append({"spec": {**job, "method": m}, "points": [], "check": None, "skipped": None,
                            "error": f"worker exited with {rc} after {timeout if rc == 'timeout' else '?'} s"
                                     if rc == "timeout" else f"worker exited with {rc}: {tail}"})
    for r in results:
        if rc == "timeout" and not r.get("error"):
            r["error"] = f"worker timed out after {timeout:.0f} s (partial results kept)"
        r["group"] = job["group"]
    return results


def run_condition(job: dict, tmp: Path, index: int, timeout: float, threads: int | str | None = None,
                  on_progress=None) -> list[dict]:
    """``run_job`` beside ``job["busy"]`` spinning processes (``benchmarks.measure.busy_cores``: pinned to a core
    each, started before the worker and killed after it, whatever happens). ``threads="auto"``: the cores the
    spinners and other programs leave idle (``fastkto.assets.idle_cores``), probed once they spin. Each result
    records its busy processes, their cores and the worker's threads."""
    from fastkto.assets import idle_cores

    with busy_cores(job.get("busy", 0)) as pinned:
        n = idle_cores() if threads == "auto" else threads
        got = run_job(job, tmp, index, timeout, n, on_progress)
    for r in got:
        r.update(busy=job.get("busy", 0), busy_cores=pinned, worker_threads=n or torch.get_num_threads())
    return got


# ------------------------------------------------------------------------------------------------ main

def _int_list(text: str, flag: str, p) -> list[int]:
    """A comma-separated list of distinct integers >= 0, in order."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        p.error(f"{flag} takes comma-separated integers, got {text!r}")
    if not values or min(values) < 0:
        p.error(f"{flag} takes integers >= 0, got {text!r}")
    return list(dict.fromkeys(values))


def _names(text: str, flag: str, choices, p) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in choices]
    if bad or not names:
        p.error(f"unknown {flag} {bad or text!r}; choose from {tuple(choices)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes: validates every workload end to end")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    p.add_argument("--shapes", default=None, help=f"primitive shapes, subset of {tuple(SHAPES)}")
    p.add_argument("--methods", default=None, help="comma-separated subset (naive is always useful to keep)")
    p.add_argument("--layouts", default="padded",
                   help=f"the e2e steps' batch layouts, subset of {LAYOUTS}; with padded and a packed one the report "
                        "gives packed / padded ratios")
    p.add_argument("--batches", type=int, default=None,
                   help="e2e: different random hh-rlhf batches per job (default: the machine profile's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<machine>[-quick][-busyN])")
    p.add_argument("--machine", default=None, help="machine name for the output folder")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per point (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed passes per point before timing")
    p.add_argument("--seed", type=int, default=0, help="inputs' seed (the same for every method)")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy checks against float64")
    p.add_argument("--isolate", action="store_true", help="CUDA: one process per method, as on the CPU")
    p.add_argument("--threads", default=None,
                   help="CPU threads per worker (OMP_NUM_THREADS): a number, or 'auto': the cores other programs "
                        "(and --busy) leave idle, probed before each worker; default: PyTorch's (all cores)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    p.add_argument("--busy", default="0", metavar="N[,N...]",
                   help="run N processes spinning beside each worker, pinned to a core each (a core taken by another "
                        "program, as on a shared laptop or CI runner); a list (0,1) measures every job under each "
                        "and the report gives busy / quiet ratios. Results go to <machine>-busyN")
    p.add_argument("--profile", type=int, nargs="?", const=12, default=0, metavar="TOP",
                   help="per job, the TOP (12) aten operations of one more pass at its largest size "
                        "(torch.profiler, the calling thread), shown quiet against busy with --busy 0,N")
    p.add_argument("--dry-run", action="store_true", help="print the plan (jobs, skips) and exit")
    p.add_argument("--summary", default=None, metavar="DIR",
                   help="print the tables and targets of DIR/results.json (or results.partial.json) and exit")
    p.add_argument("--markdown", action="store_true", help="with --summary: markdown tables (for README.md)")
    args = p.parse_args(argv)
    args.busy = _int_list(args.busy, "--busy", p)
    args.workloads = _names(args.workloads, "workload(s)", WORKLOADS, p)
    args.layouts = _names(args.layouts, "layout(s)", LAYOUTS, p)
    args.shapes = _names(args.shapes, "shape(s)", SHAPES, p) if args.shapes else None
    if args.threads not in (None, "auto") and not (args.threads.isdigit() and int(args.threads) >= 1):
        p.error(f"--threads must be 'auto' or a number >= 1, got {args.threads!r}")
    args.threads = int(args.threads) if args.threads not in (None, "auto") else args.threads
    if args.profile < 0 or (args.batches is not None and args.batches < 1):
        p.error(f"--profile and --batches must be >= 1, got {args.profile} and {args.batches}")
    return args


def output_name(args, device: torch.device) -> str:
    """<machine>[-quick][-busyN[-M...]], or --machine."""
    busy = "" if args.busy == [0] else "-busy" + "-".join(str(b) for b in args.busy)
    return args.machine or machine_name(device) + ("-quick" if args.quick else "") + busy


def run_jobs(jobs: list[dict], args, out: Path, console, report: dict) -> list[dict]:
    """Run every job (``run_condition``) under a progress bar, saving ``results.partial.json`` after each."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    results: list[dict] = []
    loads = [load_average()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    ) as progress:
        task = progress.add_task("benchmarks", total=len(jobs))
        for i, job in enumerate(jobs):
            label = job_label(job)
            progress.update(task, description=label)
            got = run_condition(job, Path(tmp), i, args.timeout, args.threads, on_progress=lambda text, label=label:
                                progress.update(task, description=f"{label}  {text}"))
            results.extend(got)
            loads.append(load_average())
            report["machine"]["load_avg"] = load_summary(loads)
            partial = {**report, "wall_s": time.perf_counter() - t0, "raw": results}
            (out / "results.partial.json").write_text(json.dumps(partial, indent=1) + "\n")
            for r in got:
                pts = ", ".join(f"{p['tokens']}: {p.get('time_s', 0):.3f}s {fmt_bytes(p.get('peak_extra_bytes'))}"
                                f" MiB" for p in r["points"])
                status = f"[red]{r['error'][:200]}[/red]" if r.get("error") else "ok"
                progress.console.print(f"  {job_label({**job, 'methods': [r['spec']['method']]}):<60} {pts}  {status}")
            progress.advance(task)
    return results


def main(argv=None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.summary:
        return print_summary(console, Path(args.summary), args.markdown)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    profile = profile_for(device, args.quick)
    jobs, skipped = plan_jobs(args, device, profile)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                 else argv))
    name = output_name(args, device)
    out = Path(args.out) if args.out else RESULTS / name
    console.print(f"[bold]{command.strip()}[/bold]: {len(jobs)} worker processes on {device}, results in {out}")
    for method, reason in dict.fromkeys((s["method"], s["reason"]) for s in skipped):
        console.print(f"  skip {method}: {reason}")
    if args.dry_run:
        for job in jobs:
            console.print(f"  job {job_label(job):<70} sizes {job['sizes']}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device)
    machine.update(name=name, worker_threads=args.threads or torch.get_num_threads(), quick=args.quick,
                   busy_levels=args.busy, dtype=jobs[0]["dtype"] if jobs else None)
    from .realdata import split_summary, token_split

    report = {"command": command.strip(), "machine": machine, "profile": profile, "skipped": skipped}
    t0 = time.perf_counter()
    results = run_jobs(jobs, args, out, console, report)
    rows = summarize(results)
    target_rows = all_targets(rows, device)
    print_report(console, rows, skipped, target_rows, machine)
    if args.quick and not (args.warmup or args.repeats):
        console.print("[yellow]--quick: no warm-up and one pass per size; these numbers check the harness, they do "
                      "not measure speed (first sizes include one-time costs)[/yellow]")
    plots = write_plots(rows, out, machine)
    report.update(wall_s=time.perf_counter() - t0, hh_rlhf_split=split_summary(token_split()), targets=target_rows,
                  rows=rows, raw=results, plots=plots)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.partial.json").unlink(missing_ok=True)
    load = machine.get("load_avg")
    under = (f" at a load average of {load['mean']:.1f} on {machine.get('cpu_count', '?')} cores (1-minute, sampled "
             f"between jobs; above the core count, other programs shared the cores and times grew)") if load else ""
    console.print(f"wrote {out / 'results.json'} and {len(plots)} plots in {time.perf_counter() - t0:.0f} s{under}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
