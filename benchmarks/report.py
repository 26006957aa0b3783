"""The report of a ``benchmarks.run`` run: rows and ratios to naive, the packed / padded and busy / quiet ratios,
the operation profiles, the targets, the terminal tables, the plots and the markdown tables, from the raw worker
results (``results.json``'s "raw") or a saved run (``--summary``).

A table or plot shows one *view*: (workload, group, layout, busy processes). Planning and running live in
``benchmarks.run``; this module only reads results.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import torch

__all__ = ["summarize", "view", "view_title", "paired_ratios", "targets", "all_targets", "print_report",
           "plot_caption", "write_plots", "markdown_tables", "print_summary", "fmt_bytes", "flops"]

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


def view(r: dict) -> tuple:
    """What one table or plot shows: (workload, group, layout or None, busy processes)."""
    return r["workload"], r["group"], r.get("layout"), r.get("busy") or 0


def view_title(key: tuple) -> str:
    workload, group, layout, busy = key
    return (f"{workload}: {group}" + (f", {layout}" if layout else "")
            + (f", {busy} busy process{'es' if busy != 1 else ''}" if busy else ""))


def summarize(results: list[dict], busy: int = 0) -> list[dict]:
    """One row per (workload, group, layout, busy, size, method), with the ratio to naive of the same point.
    ``busy``: the busy processes of results that do not record theirs (saved before ``--busy`` was an axis)."""
    rows = []
    for r in results:
        spec = r["spec"]
        for p in r["points"]:
            profile = r.get("profile")
            rows.append({"workload": spec["workload"], "group": r["group"], "masking": spec.get("masking"),
                         "layout": spec.get("layout"), "loss": spec.get("loss"), "busy": r.get("busy", busy),
                         "method": spec["method"], "size": p["size"], "tokens": p["tokens"], "scored": p["scored"],
                         "D": p.get("D"), "V": p.get("V"), "B": p.get("B"), "time_s": p.get("time_s"),
                         "peak_bytes": p.get("peak_bytes"), "alloc_peak_bytes": p.get("alloc_peak_bytes"),
                         "grad_bytes": p.get("grad_bytes"), "peak_extra_bytes": p.get("peak_extra_bytes"),
                         "check": r.get("check"), "error": r.get("error"),
                         "profile": profile["ops"] if profile and profile["size"] == p["size"] else None})
            f = flops(p, spec["workload"])
            if f and p.get("time_s"):
                rows[-1]["tflops"] = f / p["time_s"] / 1e12
    naive = {(view(r), r["size"]): r for r in rows if r["method"] == "naive"}
    for row in rows:
        ref = naive.get((view(row), row["size"]))
        if ref and ref["time_s"] and row["time_s"]:
            row["time_vs_naive"] = row["time_s"] / ref["time_s"]
    return rows


# the ratios of one point to its partner on another axis: (name, row field)
RATIOS = (("time", "time_s"), ("tensor_peak", "alloc_peak_bytes"), ("rss_peak", "peak_bytes"),
          ("tokens", "tokens"), ("x_naive", "time_vs_naive"))


def paired_ratios(rows: list[dict], axis: str, base) -> list[dict]:
    """Each point over its partner that differs only in ``axis`` (``"layout", "padded"``: the padded batch;
    ``"busy", 0``: the quiet run), grouped per (workload, group, layout, busy, method): the ratios of time, tensor
    peak, RSS peak and tokens per size and their medians, and the time relative to naive of both
    (``x_naive``, ``base_x_naive``)."""
    fields = ("workload", "group", "layout", "busy", "method")

    def key(r, **swap):
        return tuple(swap.get(f, r.get(f)) for f in (*fields, "size"))

    partners = {key(r): r for r in rows if r.get(axis) == base}
    out: dict = {}
    for r in rows:
        b = partners.get(key(r, **{axis: base}))
        if r.get(axis) in (None, base) or b is None:
            continue
        entry = out.setdefault(key(r)[:-1], {**{f: r.get(f) for f in fields}, "loss": r.get("loss"), "B": r.get("B"),
                                             "axis": axis, "base": base, "sizes": [], "base_x_naive": [],
                                             **{name: [] for name, _ in RATIOS}})
        entry["sizes"].append(r["size"])
        entry["base_x_naive"].append(b.get("time_vs_naive"))
        for name, field in RATIOS:
            entry[name].append(r.get(field) if name == "x_naive" else
                               r[field] / b[field] if r.get(field) and b.get(field) else None)
    for entry in out.values():
        for name in [n for n, _ in RATIOS] + ["base_x_naive"]:
            got = [x for x in entry[name] if x is not None]
            entry[f"{name}_median"] = statistics.median(got) if got else None
    return list(out.values())


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


def layout_targets(rows: list[dict]) -> list[dict]:
    """The packed layout's targets (issue 14), on the SmolLM2 KTO step with fastkto's head and batches of 8: packed
    time <= 0.6x padded, peak memory (tensor-level and RSS) no higher; at each busy level measured."""
    out = []
    for s in paired_ratios(rows, "layout", "padded"):
        if (s["workload"], s["loss"], s["layout"], s["method"], s["B"]) != ("e2e", "kto", "packed", "fastkto", 8):
            continue
        load = f", {s['busy']} busy" if s["busy"] else ", quiet"
        what = f"SmolLM2 KTO step, hh-rlhf batches of 8{load}"
        if s["time_median"] is not None:
            out.append({"target": f"{what}: packed time <= 0.6x padded", "measured": round(s["time_median"], 3),
                        "met": s["time_median"] <= 0.6})
        peaks = [s["tensor_peak_median"], s["rss_peak_median"]]
        if None not in peaks:
            out.append({"target": f"{what}: packed peak memory <= padded (tensor-level and RSS)",
                        "measured": [round(x, 3) for x in peaks], "met": max(peaks) <= 1.0})
    return out


def all_targets(rows: list[dict], device: torch.device) -> list[dict]:
    """``targets`` at every busy level of the run, then the packed layout's."""
    out = []
    for busy in sorted({r.get("busy") or 0 for r in rows}):
        out += targets([r for r in rows if (r.get("busy") or 0) == busy], device, busy)
    return out + layout_targets(rows)


def print_report(console, rows, skipped, target_rows, machine):
    """The run in the terminal (a rich ``console``): a table per view, the skipped methods and the errors, the
    packed / padded and busy / quiet ratios, the operation profiles, the throughput next to the GPU's matmul rate,
    and the targets."""
    _print_tables(console, rows, machine)
    _print_skips_and_errors(console, rows, skipped)
    _print_ratios(console, paired_ratios(rows, "layout", "padded"), "packed / padded (same examples)")
    _print_ratios(console, paired_ratios(rows, "busy", 0), "busy / quiet (same job)")
    _print_profiles(console, rows)
    _print_throughput(console, rows, machine)
    _print_targets(console, target_rows, machine)


def _print_tables(console, rows, machine):
    from rich.table import Table

    for key in dict.fromkeys(view(r) for r in rows):
        table = Table(title=f"{view_title(key)}  [{machine['name']}, {machine['device']}]")
        peak_col = "peak RSS MiB" if machine["device"] == "cpu" else "peak alloc MiB"
        for col in ("tokens", "scored", "method", "time (s)", "x naive", peak_col, "tensor peak MiB", "grads MiB",
                    "extra beyond grads MiB", "max |err| value / dH / dW", "TFLOP/s"):
            table.add_column(col, justify="right" if col not in ("method",) else "left")
        sel = sorted((r for r in rows if view(r) == key),
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


def _ratio_cells(s: dict) -> list[str]:
    """A ratio summary's cells: time (its range over the sizes), tensor peak, RSS peak, tokens, and the time
    relative to naive before -> after."""
    def med(name):
        x = s[f"{name}_median"]
        return "-" if x is None else f"{x:.2f}x"

    times = [x for x in s["time"] if x is not None]
    spread = f" ({min(times):.2f}-{max(times):.2f})" if len(times) > 1 else ""
    naive = "-" if s["x_naive_median"] is None else f"{med('base_x_naive')} -> {med('x_naive')}"
    return [med("time") + spread, med("tensor_peak"), med("rss_peak"), med("tokens"), naive]


RATIO_COLUMNS = ("time", "tensor peak", "RSS peak", "tokens", "x naive: base -> this")


def _print_ratios(console, summary: list[dict], title: str):
    """One row per (view, method): the medians over the sizes of ``paired_ratios``."""
    if not summary:
        return
    from rich.table import Table

    table = Table(title=f"{title}: medians over the sizes (range)")
    for col in ("view", "method", "sizes", *RATIO_COLUMNS):
        table.add_column(col, justify="left" if col in ("view", "method") else "right")
    for s in summary:
        table.add_row(view_title(view(s)), s["method"], str(len(s["sizes"])), *_ratio_cells(s))
    console.print(table)


def _print_profiles(console, rows):
    """Per (workload, group, layout, method): the profiled operations' calls and time per call at each busy level,
    and the slow-down of the busiest against the quietest."""
    from rich.table import Table

    profiled = [r for r in rows if r.get("profile")]
    for key in dict.fromkeys(view(r)[:3] + (r["method"],) for r in profiled):
        runs = sorted((r for r in profiled if view(r)[:3] + (r["method"],) == key), key=lambda r: r.get("busy") or 0)
        table = Table(title=f"operations of one pass (calling thread): {view_title(key[:3] + (0,))}, {key[3]}, "
                            f"{runs[0]['tokens']} tokens")
        levels = [r.get("busy") or 0 for r in runs]
        for col in ("op", "calls", *(f"ms/call, {b} busy" for b in levels), *(["x"] if len(runs) > 1 else [])):
            table.add_column(col, justify="left" if col == "op" else "right")
        ops = [{o["op"]: o for o in r["profile"]} for r in runs]
        for op in runs[0]["profile"]:
            per_call = [o[op["op"]]["ms_per_call"] if op["op"] in o else None for o in ops]
            cells = ["-" if x is None else f"{x:.3f}" for x in per_call]
            if len(runs) > 1:
                cells.append("-" if per_call[-1] is None or not per_call[0] else f"{per_call[-1] / per_call[0]:.1f}")
            table.add_row(op["op"], str(op["calls"]), *cells)
        console.print(table)


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
    for key in dict.fromkeys(view(r) for r in rows):
        sel = [r for r in rows if view(r) == key and r["time_s"]]
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
        fig.suptitle(view_title(key))
        if machine:
            caption = plot_caption({**machine, "busy_processes": key[3]})
            fig.text(0.5, 0.01, caption, ha="center", fontsize=8, color="dimgray")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        name = re.sub(r"[^a-z0-9.]+", "_", view_title(key).replace(": ", "_").lower()).strip("_") + ".png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def markdown_tables(rows: list[dict]) -> str:
    """One markdown table per view: a row per size, a column per method, "time s, extra MiB"; then the packed /
    padded and busy / quiet ratios."""
    out = []
    for key in dict.fromkeys(view(r) for r in rows):
        sel = [r for r in rows if view(r) == key and r["time_s"]]
        methods = sorted({r["method"] for r in sel}, key=lambda m: (m != "naive", m))
        out += [f"**{view_title(key)}** (time per forward + backward; peak memory beyond the gradients)", "",
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
    for axis, base, title in (("layout", "padded", "packed / padded"), ("busy", 0, "busy / quiet")):
        summary = paired_ratios(rows, axis, base)
        if summary:
            out += [f"**{title}** (medians over the sizes, time range in brackets)", "",
                    "| view | method | " + " | ".join(RATIO_COLUMNS) + " |", "| --- |" * (2 + len(RATIO_COLUMNS))]
            out += [f"| {view_title(view(s))} | {s['method']} | " + " | ".join(_ratio_cells(s)) + " |"
                    for s in summary]
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
    # saved before --busy was an axis: the run's busy processes are every row's
    busy = report["machine"].get("busy_processes", 0)
    rows = [{"busy": busy, **r} for r in report.get("rows") or summarize(report["raw"], busy)]
    if markdown:
        print(markdown_tables(rows))
        return 0
    console.print(f"{report['command']}  ({name}, {report.get('wall_s', 0):.0f} s)")
    device = torch.device("cuda" if report["machine"]["device"].startswith("cuda") else "cpu")
    print_report(console, rows, report["skipped"], report.get("targets") or all_targets(rows, device),
                 report["machine"])
    return 0
