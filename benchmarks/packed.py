"""Packed vs padded KTO and DPO steps of SmolLM2-135M-Instruct on real hh-rlhf rows (issue 14).

    python -m benchmarks.packed                 # quiet machine
    python -m benchmarks.packed --busy 1        # one busy-looping process beside the run

One step, as in ``benchmarks/e2e.py`` (fastkto's head in both layouts, so only the layout differs):

* KTO: the policy's forward and backward over the batch, the reference's forward over it, and both models'
  forwards over the KL pairs (prompt i with completion i + 1, ``KTOCollator``), then ``KTOLoss``.
* DPO: the policy's forward and backward and the reference's forward over the 2P sequences (P chosen, then P
  rejected, ``PairedCollator``), then ``DPOLoss``.

Layouts (``--layouts``), the same examples in each:

* padded: ``KTOCollator`` / ``PairedCollator`` batches right-padded to the longest row, ``hidden_states`` with the
  attention mask, transformers' SDPA attention.
* packed: the same collators with ``packed=True``: one row of all the batch's tokens, position ids restarting per
  sequence, ``cu_seqlens`` into the losses, and fastkto's varlen SDPA (``use_varlen_sdpa``: causal SDPA on each
  packed sequence).
* packed_dense: the packed batch under transformers' own SDPA, which keeps the rows apart with a dense
  (T_total x T_total) block-diagonal mask (what a packed batch gets without ``use_varlen_sdpa``).

The reference is a frozen copy of the policy.

Data: pairs of the shipped hh-rlhf harmless-base test file, rendered with SmolLM2's chat template
(``fastkto.data.tokenize_prompt_completion``, as ``examples/train.py``), keeping pairs whose longer sequence has at
most ``--max-row`` tokens (nothing is truncated); each measured batch is a seeded random sample of them. KTO rows
take the chosen completion on even rows (desirable), the rejected one on odd rows. Where the GGUF is missing (the
GPU image), the SmolLM2 architecture with random weights and random token ids with the cached real lengths
(``benchmarks/results/hh_rlhf_split.json``) stand in: the time of a step does not depend on the values.

Measured per (loss, layout, batch): the median step time over ``--repeats`` after ``--warmup`` steps; one more
step under the profiler for the tensor-level peak (``fastkto.memory.track_peak_memory``'s computation) and the
process's peak resident set above the step's start (``benchmarks.measure.memory_pass``); the backbone positions
computed (every forward of the step: the padded batch's B x T, the packed batch's tokens) and the tokens scored.
Results: ``benchmarks/results/<machine>-packed/packed[-busyN].json`` and ``summary[-busyN].md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = ["load_examples", "step_point", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
TINY_CONFIG = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)


def load_model(tiny: bool, dtype: torch.dtype):
    """(model, tokenizer or None, description): SmolLM2 (``benchmarks.e2e.load_model``) or a tiny random Llama."""
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).to(dtype), None, "tiny random Llama (smoke test)"
    from .e2e import load_model as load_smollm2

    return load_smollm2(dtype, torch.device("cpu"))


def load_examples(tokenizer, n_pairs: int, max_row: int, seed: int, vocab: int) -> tuple[list[dict], str]:
    """``n_pairs`` tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) whose longer sequence fits
    ``max_row`` tokens, in a seeded random order, and where they come from."""
    rng = random.Random(seed)
    if tokenizer is None:  # no tokenizer (tiny model, GPU image): the real lengths, random ids
        from .realdata import token_split

        lengths = [(p, c, r) for p, c, r in token_split()["pairs"] if p + max(c, r) <= max_row]
        rng.shuffle(lengths)

        def ids(n):
            return [rng.randrange(3, vocab) for _ in range(n)]

        return ([{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in
                 lengths[:n_pairs]], "hh-rlhf token lengths (results/hh_rlhf_split.json), random ids")
    from fastkto.data import tokenize_prompt_completion

    from .realdata import load_pairs

    pairs = load_pairs()
    rng.shuffle(pairs)
    out = []
    for prompt, chosen, rejected in pairs:
        if not (chosen.strip() and rejected.strip()):
            continue
        p, c = tokenize_prompt_completion(tokenizer, prompt, chosen)
        p2, r = tokenize_prompt_completion(tokenizer, prompt, rejected)
        if p2 == p and len(p) + max(len(c), len(r)) <= max_row:
            out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
        if len(out) == n_pairs:
            break
    return out, "hh-rlhf harmless-base test, SmolLM2 chat template"


def _batch(kind: str, pairs: list[dict], packed: bool, pad: int) -> dict:
    from fastkto.data import KTOCollator, PairedCollator

    if kind == "kto":
        rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids" if i % 2 == 0 else "rejected_ids"],
                 "label": i % 2 == 0} for i, e in enumerate(pairs)]
        return KTOCollator(pad_token_id=pad, packed=packed)(rows)
    return PairedCollator(pad_token_id=pad, packed=packed)(pairs)


LAYOUTS = ("padded", "packed", "packed_dense")


def step_point(kind: str, layout: str, model, ref, pairs: list[dict], pad: int):
    """A ``benchmarks.workloads.Point`` whose ``run()`` is one KTO / DPO step over ``pairs`` in ``layout`` (one of
    ``LAYOUTS``; it sets both models' attention implementation accordingly)."""
    from fastkto.integrations.transformers import get_lm_head, hidden_states, use_varlen_sdpa
    from fastkto.loss import DPOLoss, KTOLoss

    from .workloads import Point

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    packed = layout != "padded"
    for m in (model, ref):
        if layout == "packed":
            use_varlen_sdpa(m)
        else:
            m.set_attn_implementation("sdpa")
    batch = _batch(kind, pairs, packed, pad)
    head, ref_head = get_lm_head(model), get_lm_head(ref)
    transform = {"softcap": head.softcap, "temperature": head.temperature}
    heads = {"bias": head.bias, "ref_weight": ref_head.weight, "ref_bias": ref_head.bias}
    prefixes = ("", "kl_") if kind == "kto" else ("",)

    def hidden(m, prefix):
        if packed:
            return hidden_states(m, batch[f"{prefix}input_ids"], cu_seqlens=batch[f"{prefix}cu_seqlens"])
        return hidden_states(m, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])

    def layout_args(prefix=""):
        return {f"{prefix}cu_seqlens": batch[f"{prefix}cu_seqlens"]} if packed else {}

    if kind == "kto":
        loss_fn = KTOLoss(beta=0.1, **transform)

        def run():
            h = hidden(model, "")
            with torch.no_grad():
                rh, kh, krh = hidden(ref, ""), hidden(model, "kl_"), hidden(ref, "kl_")
            loss_fn(h, head.weight, batch["labels"], batch["desirable"], ref_hidden=rh, kl_hidden=kh,
                    kl_labels=batch["kl_labels"], kl_ref_hidden=krh, **heads, **layout_args(),
                    **layout_args("kl_")).loss.backward()
    else:
        loss_fn = DPOLoss(beta=0.1, **transform)

        def run():
            h = hidden(model, "")
            with torch.no_grad():
                rh = hidden(ref, "")
            loss_fn(h, head.weight, batch["labels"], ref_hidden=rh, **heads, **layout_args()).loss.backward()

    # positions the backbone computes: the policy and the reference over each set of sequences (KTO: the batch and
    # its KL pairs), padding included where there is padding
    positions = 2 * sum(batch[f"{p}input_ids"].numel() for p in prefixes)
    tokens = 2 * sum(int(batch[f"{p}input_ids"].numel() if packed else batch[f"{p}attention_mask"].sum())
                     for p in prefixes)
    scored = int((batch["labels"] != -100).sum())
    sequences = len(batch["cu_seqlens"]) - 1 if packed else batch["labels"].shape[0]
    shape = tuple(batch["input_ids"].shape)
    info = {"shape": list(shape), "kl_shape": list(batch["kl_input_ids"].shape) if kind == "kto" else None,
            "sequences": sequences, "positions": positions, "real_tokens": tokens, "scored_tokens": scored}
    leaves = [p for p in model.parameters() if p.requires_grad]
    return Point(run, leaves, positions, scored, info)


def measure(args) -> dict:
    from .measure import lower_mmap_threshold, memory_pass, time_passes

    dtype = getattr(torch, args.dtype)
    model, tokenizer, desc = load_model(args.tiny, dtype)
    model.train()  # SmolLM2 has no dropout: train mode changes nothing but is what training runs
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    per_batch = {"kto": args.batch, "dpo": args.dpo_pairs}
    need = max(per_batch.values()) * args.batches
    pairs, source = load_examples(tokenizer, need, args.max_row, args.seed, model.config.vocab_size)
    if len(pairs) < need:
        raise SystemExit(f"only {len(pairs)} pairs fit --max-row {args.max_row}; need {need}")
    rows, device = [], torch.device("cpu")
    for kind in args.losses:
        for b in range(args.batches):
            chosen = pairs[b * per_batch[kind]:(b + 1) * per_batch[kind]]
            for layout in args.layouts:
                point = step_point(kind, layout, model, ref, chosen, pad)
                t0 = time.perf_counter()
                timing = time_passes(point, device, args.warmup, args.repeats)
                row = {"loss": kind, "layout": layout, "batch_index": b, **point.info, **timing}
                rows.append(row)
                times = [round(t, 2) for t in timing["times_s"]]
                print(f"{kind} batch {b} {layout:6s} {timing['time_s']:7.2f} s  times {times}  shape "
                      f"{point.info['shape']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    # memory after all timing (as benchmarks.run): glibc returns freed blocks to the OS, so the RSS can fall
    # between passes
    lower_mmap_threshold()
    for row in rows:
        b = row["batch_index"]
        chosen = pairs[b * per_batch[row["loss"]]:(b + 1) * per_batch[row["loss"]]]
        point = step_point(row["loss"], row["layout"], model, ref, chosen, pad)
        row.update(memory_pass(point, device))
    return {"model": desc, "data": source, "rows": rows}


def summarize(rows: list[dict]) -> list[dict]:
    """Per loss and packed layout: the ratios to the padded layout of time, memory and positions, per batch and
    their median."""
    out = []
    for kind in dict.fromkeys(r["loss"] for r in rows):
        for layout in [lay for lay in LAYOUTS[1:] if any(r["layout"] == lay for r in rows)]:
            ratios = {"time": [], "alloc_peak": [], "rss_peak": [], "positions": []}
            for b in sorted({r["batch_index"] for r in rows if r["loss"] == kind}):
                pad, pk = (next((r for r in rows if r["loss"] == kind and r["batch_index"] == b and
                                 r["layout"] == lay), None) for lay in ("padded", layout))
                if pad is None or pk is None:
                    continue
                ratios["time"].append(pk["time_s"] / pad["time_s"])
                ratios["alloc_peak"].append(pk["alloc_peak_bytes"] / pad["alloc_peak_bytes"])
                ratios["rss_peak"].append(pk["peak_bytes"] / pad["peak_bytes"])
                ratios["positions"].append(pk["positions"] / pad["positions"])
            if ratios["time"]:
                out.append({"loss": kind, "layout": layout,
                            **{f"{k}_ratio_median": statistics.median(v) for k, v in ratios.items()},
                            **{f"{k}_ratios": v for k, v in ratios.items()}})
    return out


def write_summary(report: dict, path: Path) -> None:
    m = report["machine"]
    lines = [
        "# Packed vs padded KTO / DPO steps", "",
        f"Command: `{report['command']}`  ",
        f"Model: {report['model']}, {report['dtype']}; data: {report['data']}  ",
        f"Machine: {m['platform']}, {m['cpu_count']} cores, torch {m['torch']}, {m['threads']} threads, "
        f"{m['busy_processes']} busy process(es) beside the run; median of {report['repeats']} steps after "
        f"{report['warmup']} warm-up", "",
        "| loss | batch | layout | shape | sequences | positions | real tokens | scored | step s | alloc peak MiB "
        "| RSS peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['loss']} | {r['batch_index']} | {r['layout']} | {tuple(r['shape'])} | {r['sequences']} | "
                     f"{r['positions']} | {r['real_tokens']} | {r['scored_tokens']} | {r['time_s']:.2f} | "
                     f"{r['alloc_peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / 2**20:.0f} |")
    lines += ["", "Ratios to the padded step (median over the batches):", "",
              "| loss | layout | time | alloc peak | RSS peak | positions |", "|---|---|---|---|---|---|"]
    for s in report["summary"]:
        lines.append(f"| {s['loss']} | {s['layout']} | {s['time_ratio_median']:.2f} | "
                     f"{s['alloc_peak_ratio_median']:.2f} | {s['rss_peak_ratio_median']:.2f} | "
                     f"{s['positions_ratio_median']:.2f} |")
    for t in report["targets"]:
        lines.append(f"\nTarget: {t['target']}: measured {t['measured']} -> {'met' if t['met'] else 'MISSED'}")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.packed", description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", default="kto,dpo", help="comma-separated subset of kto,dpo")
    p.add_argument("--layouts", default="padded,packed", help=f"comma-separated subset of {','.join(LAYOUTS)}")
    p.add_argument("--batch", type=int, default=8, help="KTO examples per batch (each with its KL pair)")
    p.add_argument("--dpo-pairs", type=int, default=4, help="DPO pairs per batch (2x as many sequences)")
    p.add_argument("--batches", type=int, default=2, help="different random batches measured per loss")
    p.add_argument("--max-row", type=int, default=512, help="pairs whose longer sequence has more tokens are left out")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per point (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per point first")
    p.add_argument("--busy", type=int, default=0, help="busy-looping processes beside the run")
    p.add_argument("--threads", default="auto",
                   help="torch threads: a number, or 'auto': the cores other programs leave idle (probed after the "
                        "busy processes start), as examples/train.py")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (smoke test), not SmolLM2")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<machine>-packed)")
    args = p.parse_args(argv)
    args.losses = [x for x in args.losses.split(",") if x]
    if not args.losses or set(args.losses) - {"kto", "dpo"}:
        p.error("--losses must name kto and / or dpo")
    args.layouts = [x for x in args.layouts.split(",") if x]
    if set(args.layouts) - set(LAYOUTS) or "padded" not in args.layouts or len(args.layouts) < 2:
        p.error(f"--layouts must name padded and at least one of {LAYOUTS[1:]}")
    for name in ("batch", "dpo_pairs", "batches", "max_row", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch < 2:
        p.error("--batch must be >= 2 (the KL pairs pair prompt i with completion i + 1)")
    if args.warmup < 0 or args.busy < 0:
        p.error("--warmup and --busy must be >= 0")
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) >= 1):
        p.error("--threads must be 'auto' or a number >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from fastkto.assets import idle_cores

    from .run import busy_processes, machine_info

    argv = sys.argv[1:] if argv is None else list(argv)
    with busy_processes(args.busy):
        threads = idle_cores() if args.threads == "auto" else int(args.threads)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            measured = measure(args)
        finally:
            torch.set_num_threads(before)
    machine = {**machine_info(torch.device("cpu")), "threads": threads, "busy_processes": args.busy,
               "processor": platform.processor() or platform.machine()}
    summary = summarize(measured["rows"])
    targets = []
    kto = next((s for s in summary if s["loss"] == "kto" and s["layout"] == "packed"), None)
    if kto is not None and not args.tiny and args.batch == 8:
        load = f", {args.busy} busy" if args.busy else ", quiet"
        targets.append({"target": f"SmolLM2 KTO step, hh-rlhf batches of 8{load}: packed time <= 0.6x padded",
                        "measured": round(kto["time_ratio_median"], 3), "met": kto["time_ratio_median"] <= 0.6})
        targets.append({"target": f"SmolLM2 KTO step, hh-rlhf batches of 8{load}: packed peak memory <= padded "
                                  "(tensor-level and RSS)",
                        "measured": [round(kto["alloc_peak_ratio_median"], 3), round(kto["rss_peak_ratio_median"], 3)],
                        "met": kto["alloc_peak_ratio_median"] <= 1.0 and kto["rss_peak_ratio_median"] <= 1.0})
    report = {"command": "python -m benchmarks.packed " + " ".join(argv), "dtype": args.dtype,
              "repeats": args.repeats, "warmup": args.warmup, "machine": machine, **measured, "summary": summary,
              "targets": targets, "settings": {k: v for k, v in vars(args).items()}}
    from .run import machine_name

    out = Path(args.out) if args.out else RESULTS / f"{machine_name(torch.device('cpu'))}-packed"
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-busy{args.busy}" if args.busy else ""
    (out / f"packed{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_summary(report, out / f"summary{suffix}.md")
    print((out / f"summary{suffix}.md").read_text())
    return report


if __name__ == "__main__":
    main()
