"""The main job: fastkto against the naive head and the peers, on whatever machine this runs.

    python -m benchmarks.run                      # the full run for this machine (CPU: about 10-15 minutes)
    python -m benchmarks.run --quick              # tiny shapes, every workload, end to end (a few minutes)
    python -m benchmarks.run --workloads kto,dpo --out /tmp/bench

Workloads (``benchmarks.workloads``, ``benchmarks.e2e``): the primitive on four real LM heads, a whole KTO step
and a whole DPO step without masking and with the masking of real hh-rlhf batches, and a KTO step of
SmolLM2-135M-Instruct on real batches. Methods: naive (logits materialized), fastkto (torch backend; triton on
CUDA), TRL's chunked head, Liger-Kernel's fused KTO / DPO losses, Cut Cross-Entropy (CUDA); a method that cannot
run here is skipped with the reason printed.

Every (workload, shape, masking, method) runs in its own worker process on the CPU (``benchmarks.worker``);
on CUDA one process per (workload, shape, masking). Results: a table in the terminal, ``results.json`` and PNG
plots (memory and time against tokens, one line per method) in ``--out`` (default
``benchmarks/results/<machine>/``, ``<machine>-quick`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
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

from .peers import skip_reason
from .workloads import METHODS, SHAPES, profile_for

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("primitive", "kto", "dpo", "e2e")
MIB = 2**20
MASKING = {"none": "no masking", "real": "hh-rlhf masking"}  # group labels of the step workloads
FLAT = 1.25  # "flat": the largest peak of the sweep at most 1.25x the smallest while the tokens grow 4x


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

def plan_jobs(args, device: torch.device, profile: dict) -> tuple[list[dict], list[dict]]:  # noqa: C901 - planning to split (issue 24)
    """(jobs to run, skipped methods with their reasons). A job is a worker spec."""
    base = {"dtype": args.dtype or profile["dtype"], "device": str(device), "seed": args.seed, "allocator": True}

    def timing(workload):
        t = dict(profile["timing"]["steps" if workload in ("kto", "dpo") else workload])
        if args.warmup is not None:
            t["warmup"] = args.warmup
        if args.repeats is not None:
            t["repeats"] = args.repeats
        return t
    wanted = set(args.methods.split(",")) if args.methods else None
    jobs, skipped = [], []

    def add(workload, group, methods, **spec):
        runnable = []
        methods = [m for m in methods if m not in profile.get("skip", {}).get(workload, ())]
        for m in methods:
            if wanted is not None and m not in wanted and not (m.startswith("fastkto") and "fastkto" in wanted):
                continue
            reason = skip_reason(m, device)
            if reason:
                skipped.append({"workload": workload, "group": group, "method": m, "reason": reason})
            else:
                runnable.append(m)
        if not runnable:
            return
        per_process = runnable if (device.type == "cpu" or args.isolate) else [runnable]
        for m in per_process:
            jobs.append({**base, **timing(workload), "workload": workload, "group": group,
                         "methods": m if isinstance(m, list) else [m], **spec})

    check = None if args.no_check else profile["check"]
    for workload in args.workloads:
        if workload == "primitive":
            for shape, sizes in profile["primitive"].items():
                if args.shapes and shape not in args.shapes:
                    continue
                add(workload, shape, METHODS[workload], shape=shape, sizes=sizes, batch=None, masking="none",
                    check=check)
        elif workload in ("kto", "dpo"):
            steps = profile["steps"]
            for masking in ("none", "real"):
                add(workload, f"{steps['shape']}, {MASKING[masking]}", METHODS[workload], shape=steps["shape"],
                    sizes=steps["T"], batch=steps["batch"], masking=masking, check=check)
        elif workload == "e2e":
            e2e = profile["e2e"]
            add(workload, "SmolLM2-135M-Instruct, KTO, hh-rlhf", METHODS[workload], shape="smollm2-135m",
                sizes=[e2e["T"]], batch=e2e["batch"], masking="real", check=None)
    return jobs, skipped


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


# ------------------------------------------------------------------------------------------------ report

def _fmt_bytes(b):
    return "-" if b is None else f"{b / MIB:,.1f}"


def _fmt_err(check):
    if not check:
        return "-"
    return " / ".join(f"{check[k]:.1e}" for k in ("value", "grad_hidden", "grad_weight"))


def flops(point: dict, workload: str) -> float | None:
    """Primitive forward + backward flops counted as 2NDV forward + 6NDV backward (recompute included)."""
    if workload != "primitive":
        return None
    return 8.0 * point["N"] * point["D"] * point["V"]


def summarize(results: list[dict]) -> list[dict]:
    """One row per (workload, group, size, method), with the ratios to naive of the same point."""
    rows = []
    naive = {}
    for r in results:
        for p in r["points"]:
            if r["spec"]["method"] == "naive":
                naive[(r["spec"]["workload"], r["group"], p["size"])] = p
    for r in results:
        spec = r["spec"]
        for p in r["points"]:
            ref = naive.get((spec["workload"], r["group"], p["size"]))
            row = {"workload": spec["workload"], "group": r["group"], "masking": spec.get("masking"),
                   "method": spec["method"], "size": p["size"],
                   "tokens": p["tokens"], "scored": p["scored"], "D": p.get("D"), "V": p.get("V"),
                   "time_s": p.get("time_s"),
                   "peak_bytes": p.get("peak_bytes"), "alloc_peak_bytes": p.get("alloc_peak_bytes"),
                   "grad_bytes": p.get("grad_bytes"), "peak_extra_bytes": p.get("peak_extra_bytes"),
                   "check": r.get("check"), "error": r.get("error")}
            if ref and ref.get("time_s") and p.get("time_s"):
                row["time_vs_naive"] = p["time_s"] / ref["time_s"]
            f = flops(p, spec["workload"])
            if f and p.get("time_s"):
                row["tflops"] = f / p["time_s"] / 1e12
            rows.append(row)
    return rows


def targets(rows: list[dict], device: torch.device, busy: int = 0) -> list[dict]:
    """The targets, measured against this run (never assumed). With ``busy`` competing processes: the
    shared-core targets (KTO step <= 1.2x naive, <= 0.5x with masking; the SmolLM2 primitive <= 1.2x naive)."""
    out = []

    def pick(workload, masking, method):
        return sorted((r for r in rows if r["workload"] == workload and r.get("masking") == masking
                       and r["method"] == method and r["time_s"]), key=lambda r: r["size"])

    fast = "fastkto-triton" if device.type == "cuda" else "fastkto-torch"
    for masking in ("none", "real"):
        mine = pick("kto", masking, fast)
        if not mine:
            continue
        peaks = [r["peak_extra_bytes"] for r in mine if r["peak_extra_bytes"] is not None]
        if peaks:
            flat = max(peaks) / max(min(peaks), 1)
            out.append({"target": f"KTO step ({MASKING[masking]}): {fast} peak extra memory flat as tokens grow "
                                  f"{mine[-1]['tokens'] // mine[0]['tokens']}x and <= 64 MiB",
                        "measured": f"{', '.join(_fmt_bytes(p) for p in peaks)} MiB (max/min {flat:.2f})",
                        "met": max(peaks) <= 64 * MIB and flat <= FLAT})
        if busy:
            limit = 1.2 if masking == "none" else 0.5
        else:
            limit = 1.25 if masking == "none" else 0.8
        ratios = [r.get("time_vs_naive") for r in mine if r.get("time_vs_naive")]
        if ratios:
            shared = f", {busy} busy process{'es' if busy > 1 else ''}" if busy else ""
            out.append({"target": f"KTO step ({MASKING[masking]}{shared}): time <= {limit}x naive",
                        "measured": ", ".join(f"{x:.2f}x" for x in ratios), "met": max(ratios) <= limit})
        for peer in ("trl", "liger"):
            theirs = {r["size"]: r["time_s"] for r in pick("kto", masking, peer)}
            pairs = [(r["time_s"], theirs[r["size"]]) for r in mine if r["size"] in theirs]
            if pairs:
                out.append({"target": f"KTO step ({MASKING[masking]}): {fast} faster than {peer}",
                            "measured": ", ".join(f"{a:.3f}s vs {b:.3f}s" for a, b in pairs),
                            "met": all(a < b for a, b in pairs)})
    prim = [r for r in pick("primitive", "none", fast) if r["group"] == "smollm2-135m" and r.get("time_vs_naive")]
    if busy and prim:
        out.append({"target": f"primitive (SmolLM2 head, {busy} busy process{'es' if busy > 1 else ''}): time <= "
                              f"1.2x naive",
                    "measured": ", ".join(f"{r['tokens']}: {r['time_vs_naive']:.2f}x" for r in prim),
                    "met": max(r["time_vs_naive"] for r in prim) <= 1.2})
    return out


def print_report(console, rows, skipped, target_rows, machine):  # noqa: C901 - to move to a report module (issue 24)
    from rich.table import Table

    groups = []
    for r in rows:
        key = (r["workload"], r["group"])
        if key not in groups:
            groups.append(key)
    for workload, group in groups:
        table = Table(title=f"{workload}: {group}  [{machine['name']}, {machine['device']}]")
        peak_col = "peak RSS MiB" if machine["device"] == "cpu" else "peak alloc MiB"
        for col in ("tokens", "scored", "method", "time (s)", "x naive", peak_col, "tensor peak MiB", "grads MiB",
                    "extra beyond grads MiB", "max |err| value / dH / dW", "TFLOP/s"):
            table.add_column(col, justify="right" if col not in ("method",) else "left")
        sel = sorted((r for r in rows if (r["workload"], r["group"]) == (workload, group)),
                     key=lambda r: (r["size"], r["method"] != "naive", r["method"]))
        last = None
        for r in sel:
            if last is not None and r["size"] != last:
                table.add_section()
            last = r["size"]
            table.add_row(str(r["tokens"]), str(r["scored"]), r["method"],
                          "-" if r["time_s"] is None else f"{r['time_s']:.3f}",
                          "-" if "time_vs_naive" not in r else f"{r['time_vs_naive']:.2f}",
                          _fmt_bytes(r["peak_bytes"]), _fmt_bytes(r["alloc_peak_bytes"]), _fmt_bytes(r["grad_bytes"]),
                          _fmt_bytes(r["peak_extra_bytes"]), _fmt_err(r["check"]),
                          "-" if "tflops" not in r else f"{r['tflops']:.1f}")
        console.print(table)
    if skipped:
        console.print("[bold]Skipped[/bold]")
        seen = set()
        for s in skipped:
            if (s["method"], s["reason"]) not in seen:
                seen.add((s["method"], s["reason"]))
                console.print(f"  {s['method']}: {s['reason']}")
    errors = [r for r in rows if r.get("error")]
    for r in errors:
        console.print(f"[red]error[/red] {r['workload']} {r['group']} {r['method']}: {r['error'][:300]}")
    prims = [r for r in rows if r.get("tflops")]
    if prims and machine.get("bf16_matmul_tflops"):
        console.print(f"[bold]Throughput[/bold] (primitive, 2NDV forward + 6NDV backward) next to the measured bf16 "
                      f"matmul rate of this GPU, {machine['bf16_matmul_tflops']:.0f} TFLOP/s (8192^3, CUDA events):")
        for key in dict.fromkeys((r["group"], r["method"]) for r in prims):
            best = max(r["tflops"] for r in prims if (r["group"], r["method"]) == key)
            console.print(f"  {key[0]:<14} {key[1]:<15} {best:7.1f} TFLOP/s "
                          f"({100 * best / machine['bf16_matmul_tflops']:.0f}% of matmul)")
    if target_rows:
        quick = machine.get("quick")
        console.print("[bold]Targets[/bold]" + (" [yellow](not evaluated: a --quick run has no warm-up and tiny "
                                                 "sizes, so it says nothing about speed)[/yellow]" if quick else ""))
        for t in target_rows:
            if quick:
                mark = "[yellow]not evaluated[/yellow]"
            else:
                mark = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
            console.print(f"  {mark}  {t['target']}: {t['measured']}")


# ------------------------------------------------------------------------------------------------ plots

def plot_caption(machine: dict) -> str:
    """The line under every plot: where and how it was measured."""
    parts = [f"{machine.get('name', '?')} ({machine.get('device', '?')})", f"dtype {machine.get('dtype', '?')}",
             f"{machine.get('worker_threads', '?')} torch threads"]
    busy = machine.get("busy_processes") or 0
    if busy:
        parts.append(f"{busy} busy process{'es' if busy != 1 else ''} beside the run")
    # the load the machine was under, measured (1-minute load average sampled between jobs), not assumed from --busy
    load = machine.get("load_avg")
    if load:
        parts.append(f"load average {load['mean']:.1f} ({load['min']:.1f}-{load['max']:.1f}) on "
                     f"{machine.get('cpu_count', '?')} cores")
    else:
        parts.append("load not recorded")
    parts.append(f"torch {machine.get('torch', '?')}")
    caption = ", ".join(parts)
    if machine.get("quick"):
        caption += "; --quick: no warm-up, one pass, tiny sizes: checks the harness, does not measure speed"
    return caption


def write_plots(rows: list[dict], out: Path, machine: dict | None = None) -> list[str]:
    """Memory, time and time relative to naive against tokens (scored tokens in parentheses), one line per
    method, one PNG per (workload, group), captioned with the machine and conditions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    groups = []
    for r in rows:
        if (r["workload"], r["group"]) not in groups:
            groups.append((r["workload"], r["group"]))
    for workload, group in groups:
        sel = [r for r in rows if (r["workload"], r["group"]) == (workload, group) and r["time_s"]]
        if not sel:
            continue
        fig, (ax_m, ax_t, ax_r) = plt.subplots(1, 3, figsize=(15, 4.4))
        methods = sorted({r["method"] for r in sel}, key=lambda m: (m != "naive", m))
        if len({r["tokens"] for r in sel}) == 1:  # one size (e2e): bars
            pts = [next(r for r in sel if r["method"] == m) for m in methods]
            colors = [f"C{i}" for i in range(len(pts))]
            ax_m.bar(methods, [(r["peak_extra_bytes"] or 0) / MIB for r in pts], color=colors)
            ax_t.bar(methods, [r["time_s"] for r in pts], color=colors)
            ax_r.bar(methods, [r.get("time_vs_naive") or (1.0 if r["method"] == "naive" else 0) for r in pts],
                     color=colors)
            xlabel = f"{pts[0]['tokens']} tokens ({pts[0]['scored']} scored)"
        else:
            scored = {}
            for method in methods:
                pts = sorted((r for r in sel if r["method"] == method), key=lambda r: r["tokens"])
                x = [r["tokens"] for r in pts]
                scored.update({r["tokens"]: r["scored"] for r in pts})
                style = dict(marker="o", label=method, linestyle="--" if method == "naive" else "-")
                ax_m.plot(x, [(r["peak_extra_bytes"] or 0) / MIB for r in pts], **style)
                ax_t.plot(x, [r["time_s"] for r in pts], **style)
                ratio = [(r["tokens"], 1.0 if method == "naive" else r.get("time_vs_naive")) for r in pts]
                ratio = [(t, v) for t, v in ratio if v is not None]
                if ratio:
                    ax_r.plot([t for t, _ in ratio], [v for _, v in ratio], **style)
            ticks = sorted(scored)
            for ax in (ax_m, ax_t, ax_r):
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks, [f"{t}\n({scored[t]})" for t in ticks])
                ax.minorticks_off()
            ax_m.legend()
            xlabel = "tokens in the batch (scored)"
        for ax, ylabel in ((ax_m, "peak memory beyond the gradients (MiB)"), (ax_t, "forward + backward time (s)"),
                           (ax_r, "time / naive's time")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        ax_r.axhline(1.0, color="gray", linewidth=0.8)
        fig.suptitle(f"{workload}: {group}")
        if machine:
            fig.text(0.5, 0.01, plot_caption(machine), ha="center", fontsize=8, color="dimgray")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        name = re.sub(r"[^a-z0-9.]+", "_", f"{workload}_{group}".lower()).strip("_") + ".png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def markdown_tables(rows: list[dict]) -> str:
    """One markdown table per (workload, group): a row per size, a column per method, "time s, extra MiB"."""
    out = []
    groups = list(dict.fromkeys((r["workload"], r["group"]) for r in rows))
    for workload, group in groups:
        sel = [r for r in rows if (r["workload"], r["group"]) == (workload, group) and r["time_s"]]
        methods = sorted({r["method"] for r in sel}, key=lambda m: (m != "naive", m))
        out += [f"**{workload}: {group}** (time per forward + backward; peak memory beyond the gradients)", "",
                "| tokens (scored) | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
        for tokens in sorted({r["tokens"] for r in sel}):
            cells, scored = [], None
            for m in methods:
                hit = [r for r in sel if r["method"] == m and r["tokens"] == tokens]
                if hit:
                    scored = hit[0]["scored"]
                    x = f" ({hit[0]['time_vs_naive']:.2f}x)" if m != "naive" and hit[0].get("time_vs_naive") else ""
                    cells.append(f"{hit[0]['time_s']:.3g} s{x}, {_fmt_bytes(hit[0]['peak_extra_bytes'])} MiB")
                else:
                    cells.append("-")
            out.append(f"| {tokens} ({scored}) | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def print_summary(console, folder: Path, markdown: bool = False) -> int:
    """The report of a saved run (complete, or partial when it was cut short)."""
    for name in ("results.json", "results.partial.json"):
        if (folder / name).exists():
            report = json.loads((folder / name).read_text())
            break
    else:
        console.print(f"no results.json in {folder}")
        return 1
    rows = report.get("rows") or summarize(report["raw"])
    if markdown:
        print(markdown_tables(rows))
        return 0
    console.print(f"{report['command']}  ({name}, {report.get('wall_s', 0):.0f} s)")
    device = torch.device("cuda" if report["machine"]["device"].startswith("cuda") else "cpu")
    busy = report["machine"].get("busy_processes", 0)
    print_report(console, rows, report["skipped"], report.get("targets") or targets(rows, device, busy),
                 report["machine"])
    return 0


# ------------------------------------------------------------------------------------------------ main

@contextlib.contextmanager
def busy_processes(n: int):
    """``n`` processes that spin on a core each for as long as the block runs (then are killed): the competing
    load of a shared machine, bounded by the run."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes: validates every workload end to end")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    p.add_argument("--shapes", default=None, help=f"primitive shapes, subset of {tuple(SHAPES)}")
    p.add_argument("--methods", default=None, help="comma-separated subset (naive is always useful to keep)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<machine>[-quick])")
    p.add_argument("--machine", default=None, help="machine name for the output folder")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per point (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed passes per point before timing")
    p.add_argument("--seed", type=int, default=0, help="inputs' seed (the same for every method)")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy checks against float64")
    p.add_argument("--isolate", action="store_true", help="CUDA: one process per method, as on the CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per worker (OMP_NUM_THREADS); default: PyTorch's (all cores)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="run N busy-looping processes beside the whole run (a core taken by another program, as on "
                        "a shared laptop or CI runner); they stop with the run. Results go to <machine>-busyN")
    p.add_argument("--dry-run", action="store_true", help="print the plan (jobs, skips) and exit")
    p.add_argument("--summary", default=None, metavar="DIR",
                   help="print the tables and targets of DIR/results.json (or results.partial.json) and exit")
    p.add_argument("--markdown", action="store_true", help="with --summary: markdown tables (for README.md)")
    args = p.parse_args(argv)
    if args.busy < 0:
        p.error(f"--busy must be >= 0, got {args.busy}")
    args.workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {WORKLOADS}")
    args.shapes = args.shapes.split(",") if args.shapes else None
    if args.shapes and any(s not in SHAPES for s in args.shapes):
        p.error(f"unknown shape in {args.shapes}; choose from {tuple(SHAPES)}")
    return args


def main(argv=None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.summary:
        return print_summary(console, Path(args.summary), args.markdown)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    profile = profile_for(device, args.quick)
    jobs, skipped = plan_jobs(args, device, profile)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                 else argv))
    name = args.machine or machine_name(device) + ("-quick" if args.quick else "") + (
        f"-busy{args.busy}" if args.busy else "")
    out = Path(args.out) if args.out else RESULTS / name
    console.print(f"[bold]{command.strip()}[/bold]: {len(jobs)} worker processes on {device}, results in {out}")
    for method, reason in dict.fromkeys((s["method"], s["reason"]) for s in skipped):
        console.print(f"  skip {method}: {reason}")
    if args.dry_run:
        for job in jobs:
            console.print(f"  job {job['workload']:>9} {job['group']:<34} {','.join(job['methods']):<28} "
                          f"sizes {job['sizes']}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device)
    machine["name"] = name
    machine["worker_threads"] = args.threads or torch.get_num_threads()
    machine.update(quick=args.quick, busy_processes=args.busy, dtype=jobs[0]["dtype"] if jobs else None)
    from .realdata import split_summary, token_split

    split = split_summary(token_split())
    results = []
    loads = [load_average()]
    t0 = time.perf_counter()
    with busy_processes(args.busy), tempfile.TemporaryDirectory() as tmp, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    ) as progress:
        task = progress.add_task("benchmarks", total=len(jobs))
        for i, job in enumerate(jobs):
            label = f"{job['workload']} {job['group']} {','.join(job['methods'])}"
            progress.update(task, description=label)
            got = run_job(job, Path(tmp), i, args.timeout, args.threads, on_progress=lambda text, label=label:
                          progress.update(task, description=f"{label}  {text}"))
            results.extend(got)
            loads.append(load_average())
            machine["load_avg"] = load_summary(loads)
            partial = {"command": command.strip(), "machine": machine, "profile": profile, "skipped": skipped,
                       "wall_s": time.perf_counter() - t0, "raw": results}
            (out / "results.partial.json").write_text(json.dumps(partial, indent=1) + "\n")
            for r in got:
                pts = ", ".join(f"{p['tokens']}: {p.get('time_s', 0):.3f}s {_fmt_bytes(p.get('peak_extra_bytes'))}"
                                f" MiB" for p in r["points"])
                status = f"[red]{r['error'][:200]}[/red]" if r.get("error") else "ok"
                progress.console.print(f"  {r['spec']['workload']:>9} {r['group']:<28} {r['spec']['method']:<15} "
                                       f"{pts}  {status}")
            progress.advance(task)
    rows = summarize(results)
    target_rows = targets(rows, device, args.busy)
    print_report(console, rows, skipped, target_rows, machine)
    if args.quick:
        console.print("[yellow]--quick: no warm-up and one pass per size; these numbers check the harness, they do "
                      "not measure speed (first sizes include one-time costs)[/yellow]")
    plots = write_plots(rows, out, machine)
    report = {"command": command.strip(), "machine": machine, "profile": profile, "wall_s": time.perf_counter() - t0,
              "hh_rlhf_split": split, "skipped": skipped, "targets": target_rows, "rows": rows, "raw": results,
              "plots": plots}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.partial.json").unlink(missing_ok=True)
    load = machine.get("load_avg")
    under = (f" at a load average of {load['mean']:.1f} on {machine.get('cpu_count', '?')} cores (1-minute, sampled "
             f"between jobs; above the core count, other programs shared the cores and times grew)") if load else ""
    console.print(f"wrote {out / 'results.json'} and {len(plots)} plots in {time.perf_counter() - t0:.0f} s{under}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
