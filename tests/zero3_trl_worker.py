"""One rank of TRL training runs under DeepSpeed ZeRO-3 on the CPU, for tests/test_integrations.py.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r python -m tests.zero3_trl_worker PORT_FILE OUT trl|fastkto [trl|fastkto ...]

Trains a tiny Llama for two steps with ``trl.KTOTrainer`` or ``fastkto.integrations.trl.FastKTOTrainer`` (same
config, every parameter ZeRO-3 partitioned, the LM head included), once per name given, one after the other in
this process, and writes rank 0's log history of each to OUT.<name>.json.

The rendezvous cannot race for a port: rank 0 opens the gloo store on a port the system picks (port 0, no
probe-then-bind gap another program could fall into) and publishes it in PORT_FILE, which rank 1 waits for.
accelerate and DeepSpeed then find the process group initialized and use it.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys

import torch


def rendezvous(port_file: str, rank: int, world: int) -> None:
    """Initialize the gloo process group through a store whose port rank 0 takes from the system (see above)."""
    import datetime
    import os
    import time

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=120)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        with open(port_file + ".tmp", "w") as f:
            f.write(str(store.port))
        os.replace(port_file + ".tmp", port_file)  # rank 1 never reads a half-written file
    else:
        deadline = time.monotonic() + timeout.total_seconds()
        while not os.path.exists(port_file):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 published no port in {port_file}")
            time.sleep(0.05)
        with open(port_file) as f:
            store = dist.TCPStore("127.0.0.1", int(f.read()), world, is_master=False, timeout=timeout)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(store.port)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)


def train(which: str, out: str) -> None:
    import datasets
    import transformers
    import trl
    from accelerate.state import AcceleratorState

    from fastkto.integrations.trl import FastKTOTrainer
    from tests.test_data import make_char_tokenizer

    # each run builds its own Accelerator (one DeepSpeed engine per run) on the process group made once
    AcceleratorState._reset_state(reset_partial_state=True)
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


def main(port_file: str, out: str, *which: str) -> None:
    import os

    torch.set_num_threads(1)
    import deepspeed  # noqa: F401

    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference on first use (a C++ build); ZeRO-3 does
    # not need it (the package's __init__ shadows the submodule's name with torch: take it from sys.modules)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    rendezvous(port_file, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    for name in which:
        train(name, f"{out}.{name}.json")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # the results are written: skip the interpreter's teardown, where DeepSpeed's and gloo's threads have ended a
    # process with "terminate called without an active exception" (a CI run, after both trainings had finished)
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
