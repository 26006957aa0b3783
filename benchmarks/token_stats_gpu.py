"""GPU timing of the token statistics (``fastkto.token_stats``) against the plain log-prob pass, one short run.

    python -m benchmarks.token_stats_gpu --out OUT/token_stats_gpu.json [--tokens 8192 --dim 2304 --vocab 128256]

Per shape (bf16, soft-cap 30, every token scored), CUDA events, median of 5 after a warm-up (the warm-up holds
the JIT compiles):

- forward: plain log-probs (STATS 0), + entropy (level 1), + every field (level 2);
- forward + backward: log-probs only; log-probs and entropy, both with an upstream gradient (ENT_GRAD);
- bitwise batch invariance on the device: the fields and d_hidden rows of a 4096-token subset (shuffled) against
  the same rows of the full call;
- the launched kernels' registers and spills (``n_regs`` / ``n_spills`` from Triton's compiled kernels).

Needs CUDA; about a minute on an H200 including compiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastkto
from fastkto.kernels import fused_logprob as fl


def _time_ms(fn, repeats=5):
    if not torch.cuda.is_available():  # the CPU dry run (--dry-run): wall clock
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _kernels():
    out = {}
    for name in ("_logprob_fwd_kernel", "_logprob_dz_kernel"):
        fn = getattr(fl, name)
        for cache in fn.device_caches.values():
            for key, k in cache[0].items():
                try:  # the compiled kernel's own numbers; the key holds the constexprs (STATS / ENT_GRAD)
                    getattr(k, "_init_handles", lambda: None)()
                    out.setdefault(name, []).append({"n_regs": k.n_regs, "n_spills": k.n_spills,
                                                     "shared": k.metadata.shared, "key": str(key)[:400]})
                except Exception as exc:  # noqa: BLE001 - a record, not a failure of the run
                    out.setdefault(name, []).append({"error": repr(exc)[:300]})
    return out


def run(tokens, dim, vocab, softcap=30.0):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hidden = (torch.randn(tokens, dim, device=dev) * 0.5).to(torch.bfloat16)
    weight = (torch.randn(vocab, dim, device=dev) * 0.05).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), device=dev)
    fields = fastkto.TOKEN_FIELDS
    row = {"tokens": tokens, "dim": dim, "vocab": vocab, "softcap": softcap}
    t0 = time.perf_counter()
    row["fwd_logprobs_ms"] = _time_ms(lambda: fastkto.fused_logprobs(hidden, weight, labels, softcap=softcap))
    row["fwd_entropy_ms"] = _time_ms(lambda: fastkto.token_stats(hidden, weight, labels, ("log_probs", "entropy"),
                                                                 softcap=softcap))
    row["fwd_all_fields_ms"] = _time_ms(lambda: fastkto.token_stats(hidden, weight, labels, fields,
                                                                    softcap=softcap))
    g_ent = torch.randn(tokens, device=dev)

    def fwd_bwd(entropy):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        if entropy:
            got = fastkto.token_stats(h, w, labels, ("log_probs", "entropy"), softcap=softcap)
            loss = got["log_probs"].sum() + (got["entropy"] * g_ent).sum()
        else:
            loss = fastkto.fused_logprobs(h, w, labels, softcap=softcap).sum()
        loss.backward()

    row["fwd_bwd_logprobs_ms"] = _time_ms(lambda: fwd_bwd(False))
    row["fwd_bwd_logprobs_entropy_grad_ms"] = _time_ms(lambda: fwd_bwd(True))
    flops = 2.0 * tokens * dim * vocab
    row["fwd_tflops"] = flops / row["fwd_logprobs_ms"] / 1e9
    row["fwd_bwd_tflops_at_8NDV"] = 4 * flops / row["fwd_bwd_logprobs_ms"] / 1e9

    # bitwise batch invariance on the device
    def outputs(idx):
        h = hidden[idx].detach().requires_grad_()
        got = fastkto.token_stats(h, weight, labels[idx], fields, softcap=softcap)
        (got["log_probs"].sum() + (got["entropy"] * g_ent[idx]).sum()).backward()
        return {k: v.detach() for k, v in got.items()}, h.grad

    full, d_full = outputs(torch.arange(tokens, device=dev))
    checks = {}
    for n in (1, 37, min(4096, tokens)):
        idx = torch.randperm(tokens, device=dev)[:n]
        got, d_hidden = outputs(idx)
        checks[str(n)] = {name: bool(torch.equal(got[name], full[name][idx])) for name in fields}
        checks[str(n)]["d_hidden"] = bool(torch.equal(d_hidden, d_full[idx]))
        checks[str(n)]["d_hidden_max_abs_diff"] = float((d_hidden.float() - d_full[idx].float()).abs().max())
    row["batch_invariance_bitwise"] = checks
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.token_stats_gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dry-run", action="store_true", help="without CUDA: a tiny shape on the CPU path")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.tokens, args.dim, args.vocab = 256, 64, 1000
    elif not torch.cuda.is_available():
        parser.error("needs CUDA (or --dry-run)")
    result = {"torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
              "triton": __import__("triton").__version__}
    result["rows"] = [run(args.tokens, args.dim, args.vocab)]
    result["kernels"] = _kernels()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1)[:6000])


if __name__ == "__main__":
    main()
