"""The training-stack checks that need a GPU to mean anything: host syncs counted by CUDA, and torch.compile.

    python -m benchmarks.stack_check --out DIR [--device cuda] [--tokens 2048]

On CUDA:
* ``torch.cuda.set_sync_debug_mode("warn")`` counts the synchronizing calls of one ``KTOLoss`` call (policy,
  reference and KL passes; Triton path) and of its backward: the contract is one and zero.
* ``torch.compile(fullgraph=True)`` (Inductor) of the same loss: one graph, loss and gradients against eager.
* ``mode="reduce-overhead"``: the step captured and replayed as CUDA graphs (no skip), against eager.
On the CPU (a dry run of the script) the sync count is skipped and Dynamo uses ``aot_eager``.

Each check is guarded: a failure is recorded in the JSON (``DIR/stack_check.json``) and the next check runs.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from pathlib import Path

import torch

from fastkto.loss import KTOLoss


def _inputs(tokens: int, dim: int, vocab: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, steps = 4, tokens // 4
    h = (torch.randn(rows, steps, dim, generator=g) / dim**0.5).to(device, dtype)
    w = (torch.randn(vocab, dim, generator=g) / dim**0.25).to(device, dtype)
    y = torch.randint(0, vocab, (rows, steps), generator=g)
    y[:, : steps // 2] = -100  # a prompt on every row: compaction matters
    desirable = torch.tensor([True, False, True, False])
    return h, w, y.to(device), desirable.to(device)


def _loss_fn(labels, desirable, ref_weight):
    """The KTO loss of (h, w); ``ref_weight``: the reference head, a frozen copy (not a view of the trained w)."""
    kto = KTOLoss(beta=0.1)
    kl_labels = labels.roll(1, 0)

    def fn(h, w):
        return kto(h, w, labels, desirable, ref_hidden=h.detach() * 0.5, ref_weight=ref_weight,
                   kl_hidden=h.detach().roll(1, 0), kl_labels=kl_labels, kl_ref_hidden=h.detach()).loss

    return fn


def _where() -> list[str]:
    """The Python frames of fastkto (and torch.library's dispatch into it) that led to a synchronizing call: the
    warning is issued while the sync happens, so the stack at that moment names the line."""
    import traceback

    return [f"{f.filename.split('/site-packages/')[-1]}:{f.lineno} {f.name}: {f.line}"
            for f in traceback.extract_stack()[:-2] if "fastkto" in f.filename][-6:]


def _syncs(caught: list[tuple[str, list[str]]]) -> dict:
    """CUDA's synchronizing calls among the warnings caught (its one-time note that the debug mode is a prototype,
    which also says "synchronizing", is not one)."""
    syncs = [(msg, where) for msg, where in caught if "synchroniz" in msg and "prototype feature" not in msg]
    return {"count": len(syncs), "calls": [{"message": m[:120], "stack": w} for m, w in syncs[:8]]}


def count_syncs(fn, h, w) -> dict:
    """CUDA's own count of synchronizing calls in the forward and in the backward of one call, after a warm-up call
    (the first call of a process probes once which fp32-accumulating GEMM form torch offers: one more sync)."""
    fn(h.clone().requires_grad_(), w.clone().requires_grad_()).backward()
    torch.cuda.synchronize()
    result = {}
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    for phase in ("forward", "backward"):
        caught: list[tuple[str, list[str]]] = []
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *args, **kwargs: caught.append((str(message), _where()))
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if phase == "forward":
                    loss = fn(hl, wl)
                else:
                    loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        result[phase] = _syncs(caught)
    result["ok"] = result["forward"]["count"] <= 1 and result["backward"]["count"] == 0
    return result


def compile_check(fn, h, w, backend: str) -> dict:
    graphs = []
    inner = torch._dynamo.lookup_backend(backend)

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    def run(f):
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = f(hl, wl)
        loss.backward()
        return loss.detach(), hl.grad, wl.grad

    want = run(fn)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    got = run(torch.compile(fn, fullgraph=True, backend=counting))
    compile_s = time.perf_counter() - t0
    diffs = [float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(got, want, strict=True)]
    return {"backend": backend, "graphs": len(graphs), "first_call_s": round(compile_s, 2),
            "relative_diff": {"loss": diffs[0], "d_hidden": diffs[1], "d_weight": diffs[2]},
            # the operators' inputs and outputs are the same; Inductor's fused element-wise code around them may
            # round differently, by up to a bf16 ulp in the gradients it passes back in 16-bit inputs' dtype
            "ok": len(graphs) == 1 and max(diffs) < (1e-2 if h.dtype == torch.bfloat16 else 1e-4)}


def cuda_graph_check(fn, h, w) -> dict:
    """``torch.compile(mode="reduce-overhead")``: Inductor's CUDA graphs replay the whole step, fastkto's operators
    included, when nothing in it syncs or changes shape (compiled calls score every token: no data-dependent size)."""
    from torch._dynamo.utils import counters

    def run(f):
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = f(hl, wl)
        loss.backward()
        return loss.detach().clone(), hl.grad.clone(), wl.grad.clone()

    want = run(fn)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, mode="reduce-overhead")
    got = [run(compiled) for _ in range(3)]  # warm-up, record, replay
    skips = int(counters["inductor"]["cudagraph_skips"])  # Inductor counts each graph it runs without CUDA graphs
    diffs = [float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(got[-1], want, strict=True)]
    return {"cudagraph_skips": skips, "inductor_counters": {k: v for k, v in counters["inductor"].items()
                                                              if "cudagraph" in k},
            "relative_diff_replay": diffs, "ok": skips == 0 and max(diffs) < 1e-2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "stack_check.json"
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    report = {"device": args.device, "torch": torch.__version__, "tokens": args.tokens, "dim": args.dim,
              "vocab": args.vocab, "dtype": str(dtype)}
    h, w, y, desirable = _inputs(args.tokens, args.dim, args.vocab, args.device, dtype)
    fn = _loss_fn(y, desirable, w.clone())
    checks = {"syncs": (lambda: count_syncs(fn, h, w)) if cuda else None,
              "compile": lambda: compile_check(fn, h, w, "inductor" if cuda else "aot_eager"),
              "cuda_graphs": (lambda: cuda_graph_check(fn, h, w)) if cuda else None}
    for name, check in checks.items():
        if check is None:
            report[name] = {"skipped": "needs CUDA"}
            path.write_text(json.dumps(report, indent=2))
            continue
        try:
            report[name] = check()
        except Exception:  # recorded, and the next check still runs
            report[name] = {"ok": False, "error": traceback.format_exc(limit=8)}
        path.write_text(json.dumps(report, indent=2))
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if all(v.get("ok", True) for v in report.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
