"""Methods on one workload, in a process of their own: ``python -m benchmarks.worker SPEC.json OUT.json``.

On the CPU ``benchmarks.run`` starts one worker per (workload, shape, masking, method), so that nothing one
method allocates (or leaves in the allocator, or compiles) changes another's resident set. On CUDA the
allocator's peak counter is exact per pass, so one worker runs all methods of a (workload, shape, masking) in
turn, emptying the cache between them (``--isolate`` in the runner restores one process per method). For each
method the worker runs the spec's sizes in
increasing order: first the timing passes of every size, then the memory passes (see ``benchmarks.measure``
for why in that order), then the accuracy check on the small check size. It writes OUT.json after each stage,
so a crash or a timeout still leaves what was measured, and records the error instead of raising.

SPEC keys: workload (primitive, kto, dpo, e2e), methods (list), shape, sizes (tokens for primitive, T for the steps,
batch indices for e2e), batch, masking (none / real), dtype, device, seed, warmup, repeats, warmup_each_size (bool
or methods), allocator (bool: profile the memory pass), check (dict or null), profile (0 / null, or the number of
operations to list from one more pass at the largest size, ``benchmarks.measure.op_profile``); e2e only: loss
(kto / dpo), layout (padded / packed / packed_dense), max_row.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch

from .measure import lower_mmap_threshold, memory_pass, op_profile, process_info, time_passes
from .peers import skip_reason
from .workloads import build_point, run_check


def _point(spec: dict, size, state: dict):
    if spec["workload"] == "e2e":
        from .e2e import e2e_point

        return e2e_point(spec, size, state)
    return build_point(spec, size, state)


def run_spec(spec: dict, write) -> dict:
    """Measure every size of ``spec`` for ``spec["method"]``; ``write(result)`` is called after each stage."""
    device = torch.device(spec["device"])
    result = {"spec": spec, "points": [], "check": None, "error": None, "skipped": None, **process_info()}
    reason = skip_reason(spec["method"], device)
    if reason is not None:
        result["skipped"] = reason
        write(result)
        return result
    state: dict = {}
    t_start = time.perf_counter()
    try:
        each = spec.get("warmup_each_size", True)
        for i, size in enumerate(spec["sizes"]):
            point = _point(spec, size, state)
            warm = i == 0 or each is True or (isinstance(each, list) and spec["method"] in each)
            timing = time_passes(point, device, spec["warmup"] if warm else 0, spec["repeats"])
            result["points"].append({"size": size, "tokens": point.tokens, "scored": point.scored, **point.info,
                                     **timing})
            del point
            write(result)
        if device.type == "cpu":
            lower_mmap_threshold()
        for entry, size in zip(result["points"], spec["sizes"]):
            point = _point(spec, size, state)
            entry.update(memory_pass(point, device, allocator=spec.get("allocator", True)))
            del point
            write(result)
        if spec.get("profile"):  # the operations of one more pass at the largest size
            point = _point(spec, spec["sizes"][-1], state)
            result["profile"] = {"size": spec["sizes"][-1], "ops": op_profile(point, spec["profile"])}
            del point
            write(result)
        if spec.get("check"):
            result["check"] = run_check(spec, state)
    except Exception as exc:  # noqa: BLE001 - recorded and shown by the runner (e.g. out of memory)
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    result["wall_s"] = time.perf_counter() - t_start
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    write(result)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)

    results: list[dict] = []

    def write(result):
        with open(argv[1], "w") as f:
            json.dump(results + [result], f, indent=1)

    for method in spec["methods"]:
        one = {k: v for k, v in spec.items() if k != "methods"}
        results.append(run_spec({**one, "method": method}, write))
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
