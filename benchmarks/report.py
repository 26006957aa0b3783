"""The report of a ``benchmarks.run`` run: rows and ratios to naive, the targets, the terminal tables, the plots
and the markdown tables, from the raw worker results (``results.json``'s "raw") or a saved run (``--summary``).

Planning and running live in ``benchmarks.run``; this module only reads results.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

__all__ = ["summarize", "targets", "print_report", "plot_caption", "write_plots", "markdown_tables",
           "print_summary", "fmt_bytes", "flops"]

MIB = 2**20
MASKING = {"none": "no masking", "real": "hh-rlhf masking"}  # group labels of the step workloads
FLAT = 1.25  # "flat": the largest peak of the sweep at most 1.25x the smallest while the tokens grow 4x


def fmt_bytes(b):
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
                        "measured": f"{', '.join(fmt_bytes(p) for p in peaks)} MiB (max/min {flat:.2f})",
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


def print_report(console, rows, skipped, target_rows, machine):
    """The run in the terminal (a rich ``console``): a table per (workload, group), the skipped methods and the
    errors, the throughput next to the GPU's matmul rate, and the targets."""
    _print_tables(console, rows, machine)
    _print_skips_and_errors(console, rows, skipped)
    _print_throughput(console, rows, machine)
    _print_targets(console, target_rows, machine)


def _print_tables(console, rows, machine):
    from rich.table import Table

    groups = list(dict.fromkeys((r["workload"], r["group"]) for r in rows))
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
                          fmt_bytes(r["peak_bytes"]), fmt_bytes(r["alloc_peak_bytes"]), fmt_bytes(r["grad_bytes"]),
                          fmt_bytes(r["peak_extra_bytes"]), _fmt_err(r["check"]),
                          "-" if "tflops" not in r else f"{r['tflops']:.1f}")
        console.print(table)


def _print_skips_and_errors(console, rows, skipped):
    if skipped:
        console.print("[bold]Skipped[/bold]")
        for method, reason in dict.fromkeys((s["method"], s["reason"]) for s in skipped):
            console.print(f"  {method}: {reason}")
    for r in rows:
        if r.get("error"):
            console.print(f"[red]error[/red] {r['workload']} {r['group']} {r['method']}: {r['error'][:300]}")


def _print_throughput(console, rows, machine):
    prims = [r for r in rows if r.get("tflops")]
    if not (prims and machine.get("bf16_matmul_tflops")):
        return
    console.print(f"[bold]Throughput[/bold] (primitive, 2NDV forward + 6NDV backward) next to the measured bf16 "
                  f"matmul rate of this GPU, {machine['bf16_matmul_tflops']:.0f} TFLOP/s (8192^3, CUDA events):")
    for key in dict.fromkeys((r["group"], r["method"]) for r in prims):
        best = max(r["tflops"] for r in prims if (r["group"], r["method"]) == key)
        console.print(f"  {key[0]:<14} {key[1]:<15} {best:7.1f} TFLOP/s "
                      f"({100 * best / machine['bf16_matmul_tflops']:.0f}% of matmul)")


def _print_targets(console, target_rows, machine):
    if not target_rows:
        return
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
                    cells.append(f"{hit[0]['time_s']:.3g} s{x}, {fmt_bytes(hit[0]['peak_extra_bytes'])} MiB")
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
