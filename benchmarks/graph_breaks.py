"""Graph breaks of a compiled KTO / DPO training step: TRL's own trainer against fastkto's, side by side.

    python -m benchmarks.graph_breaks [--trainers trl,fastkto] [--loss kto] [--steps 2] [--out FILE]

Each trainer trains a tiny random Llama (2 layers, a character vocabulary) on a small local preference set with
``torch_compile=True`` (HF Trainer compiles the model; Dynamo's ``eager`` backend, so what is counted is tracing,
not code generation) and reports Dynamo's counters: graph breaks by reason and the number of graphs compiled.
A break splits the step into graphs that run separately, each a place where the compiler cannot fuse or capture
(CUDA graphs), and each a host round-trip.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

_FACTS = [(f"What is {a} plus {b}?", f" {a + b}.", f" {a + b + 1}, maybe.") for a, b in
          [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 2), (4, 4), (8, 1)]]


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _dataset(loss: str):
    from datasets import Dataset

    if loss == "kto":
        rows = [{"prompt": q, "completion": good if i % 2 else bad, "label": bool(i % 2)}
                for i, (q, good, bad) in enumerate(_FACTS)]
    else:
        rows = [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in _FACTS]
    return Dataset.from_list(rows)


def count(trainer_name: str, loss: str = "kto", steps: int = 2) -> dict:
    """Dynamo's counters over ``steps`` compiled training steps of one trainer ("trl" or "fastkto")."""
    import transformers
    import trl
    from torch._dynamo.utils import counters

    from fastkto.integrations.trl import FastDPOTrainer, FastKTOTrainer

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    with tempfile.TemporaryDirectory() as folder:
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        config_cls = trl.KTOConfig if loss == "kto" else trl.DPOConfig
        args = config_cls(output_dir=folder, per_device_train_batch_size=4, max_steps=steps, report_to="none",
                          torch_compile=True, torch_compile_backend="eager", save_strategy="no", logging_steps=1,
                          use_cpu=not torch.cuda.is_available())
        cls = {("trl", "kto"): trl.KTOTrainer, ("trl", "dpo"): trl.DPOTrainer,
               ("fastkto", "kto"): FastKTOTrainer, ("fastkto", "dpo"): FastDPOTrainer}[trainer_name, loss]
        trainer = cls(model=folder, args=args, processing_class=tok, train_dataset=_dataset(loss))
        torch._dynamo.reset()
        counters.clear()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    breaks = dict(counters["graph_break"])
    return {"trainer": trainer_name, "loss": loss, "steps": steps, "graph_breaks": sum(breaks.values()),
            "graphs": counters["stats"]["unique_graphs"], "seconds": round(seconds, 1),
            "reasons": {reason.splitlines()[0][:160]: n for reason, n in breaks.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", default="trl,fastkto")
    parser.add_argument("--loss", choices=("kto", "dpo"), default="kto")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # TRL's trainers on 2 shared cores: one thread is the quickest and the steadiest
    rows = [count(name, args.loss, args.steps) for name in args.trainers.split(",")]
    report = {"command": "python -m benchmarks.graph_breaks " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "rows": rows}
    for row in rows:
        print(f"{row['trainer']:>8} {row['loss']}: {row['graph_breaks']} graph breaks, {row['graphs']} graphs "
              f"({row['steps']} steps, {row['seconds']} s)")
        for reason, n in row["reasons"].items():
            print(f"{'':>10}{n:3d} x {reason}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
