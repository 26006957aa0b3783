"""One rank of a TRL training run under DeepSpeed ZeRO-3 on the CPU, for tests/test_integrations.py.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.zero3_trl_worker trl|fastkto OUT

Trains a tiny Llama for two steps with ``trl.KTOTrainer`` or ``fastkto.integrations.trl.FastKTOTrainer`` (same
config, every parameter ZeRO-3 partitioned, the LM head included) and writes rank 0's log history to OUT (JSON).
A separate process per run: accelerate allows one DeepSpeed-enabled Accelerator per process.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys

import torch


def main(which: str, out: str) -> None:
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401

    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference on first use (a C++ build); ZeRO-3 does
    # not need it (the package's __init__ shadows the submodule's name with torch: take it from sys.modules)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import datasets
    import transformers
    import trl

    from fastkto.integrations.trl import FastKTOTrainer
    from tests.test_data import make_char_tokenizer

    tok = make_char_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    rows = [{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}." if i % 3 else " no idea", "label": bool(i % 3)}
            for i in range(8)]
    zero3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    args = trl.KTOConfig(output_dir=out + ".d", per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", max_length=64, seed=0, optim="sgd",
                         learning_rate=0.5, disable_tqdm=True, bf16=False, deepspeed=zero3)
    cls = {"trl": trl.KTOTrainer, "fastkto": FastKTOTrainer}[which]
    trainer = cls(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                  train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    head = trainer.model.lm_head.weight  # the Trainer hands the model to DeepSpeed in train()
    assert getattr(head, "ds_status", None) is not None and head.numel() == 0, "the head must be ZeRO-3 partitioned"
    if trainer.accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(trainer.state.log_history, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
