"""Count the LM head's matrix-product FLOPs in TRL's trainers with fastkto's head, per call and per training step.

    python -m benchmarks.head_flops [--out benchmarks/results/cpu-2core/head_flops.json]

The counter is a ``TorchDispatchMode`` that sizes every matrix product (``mm``, ``addmm``, ``bmm``, ``baddbmm``,
``mv``, ``addmv``, ``dot``, ``matmul``; functional, in-place and ``out=`` forms alike: every overload of those
operators) that runs inside one of fastkto's operators (``torch.ops.fastkto.*``: it runs their implementations
with the mode still active, so the tile loop's products are seen; to the plain mode an operator is one opaque
call). Those operators are the head: the backbone's products are not counted. Counts are in units of 2 N D V
(one pass of N scored tokens through a (V, D) head); a forward needs 1, a forward + backward 4 (forward,
recompute, dH and dW GEMMs), an entropy gradient none more. Runs on the CPU on the PyTorch path (the Triton
kernels' products run inside Triton, which this mode cannot see; both paths share the plan and the loop).

Measured: (1) the adapter's calls on a tiny Gemma-2 (soft-capped head): the KTO policy call (fields log_probs,
entropy, mean_logits) forward + backward, the same with a gradient through the entropy, a no-grad call (the KL
pairs, the reference, evaluation); (2) one ``FastKTOTrainer`` training step (policy, reference, KL), in units of
2 D V per scored token of each head call the step makes.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "mv", "addmv", "addmv_", "dot", "matmul"}


def _product_flops(name: str, args) -> int:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("addmm", "addmm_", "baddbmm", "baddbmm_", "addmv", "addmv_"):
        tensors = tensors[1:]  # the accumulated input
    a, b = tensors[0], tensors[1]
    if name == "dot":
        return 2 * a.numel()
    if name in ("mv", "addmv", "addmv_"):
        return 2 * a.shape[0] * a.shape[1]
    if a.dim() == 3:  # bmm
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 2 * a.shape[-2] * a.shape[-1] * b.shape[-1]


class HeadFlops(TorchDispatchMode):
    """Counts the matrix-product FLOPs inside fastkto's operators (see the module docstring); ``calls`` lists
    (operator, flops, scored tokens) per outermost operator call."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.flops = 0
        self.calls: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastkto":
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:
                before = self.flops
                self.depth += 1
                try:
                    with self:  # run the implementation under the mode, so its products are counted
                        out = opdef._init_fn(*args, **kwargs)
                finally:
                    self.depth -= 1
                if self.depth == 0:
                    self.calls.append((func._schema.name, self.flops - before, _scored(func, args)))
                return out
        if self.depth and func.overloadpacket.__name__ in _PRODUCTS:
            self.flops += _product_flops(func.overloadpacket.__name__, args)
        return func(*args, **kwargs)


def _scored(func, args) -> int:
    name = func._schema.name
    if name in ("fastkto::logprobs", "fastkto::token_stats"):
        labels, ignore_index = args[3], args[4]
        return int((labels != ignore_index).sum())
    return -1  # the metric pass (same tokens as its log-prob pass) and the backward operators


def _tiny_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0,
                          attn_logit_softcapping=None, max_position_embeddings=128)
    config._attn_implementation = "eager"
    return Gemma2ForCausalLM(config)


def adapter_calls() -> dict:
    """Head FLOPs, in units of 2 N D V, of the adapter's three kinds of call."""
    from fastkto.integrations.trl import add_fastkto_lm_head

    model = _tiny_model()
    add_fastkto_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
    ids = torch.randint(0, 512, (4, 33))
    labels = ids.clone()
    labels[:, :9] = -100
    vocab, dim = model.lm_head.weight.shape
    scored = int((labels[:, 1:] != -100).sum())
    unit = 2 * scored * dim * vocab
    out = {}
    for name, grad in (("policy_fwd_bwd_kto_fields", "logp"), ("policy_fwd_bwd_entropy_grad", "both"),
                       ("no_grad_call", None)):
        model.zero_grad(set_to_none=True)
        with HeadFlops() as counter:
            if grad is None:
                with torch.no_grad():
                    model(input_ids=ids, labels=labels, fused_lm_head=True)
            else:
                res = model(input_ids=ids, labels=labels, fused_lm_head=True)
                loss = res.log_probs.sum() + (res.entropy.sum() if grad == "both" else 0)
                loss.backward()
        out[name] = {"flops": counter.flops, "units_2NDV": counter.flops / unit,
                     "operators": [c[0] for c in counter.calls]}
    out["shape"] = {"scored_tokens": scored, "dim": dim, "vocab": vocab}
    return out


def trainer_step(tmp_dir: str) -> dict:
    """Head FLOPs of one ``FastKTOTrainer`` training step, in units of 2 D V per scored token of its head calls."""
    import datasets
    import trl

    from fastkto.integrations.trl import FastKTOTrainer
    from tests.test_data import CHAT_TEMPLATE, make_char_tokenizer  # noqa: F401  (the suite's tiny tokenizer)

    tok = make_char_tokenizer()
    model = _tiny_model()
    model.resize_token_embeddings(len(tok)) if len(tok) > model.config.vocab_size else None
    rows = [{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}." if i % 2 else " no idea", "label": bool(i % 2)}
            for i in range(8)]
    data = datasets.Dataset.from_list(rows)
    config = trl.KTOConfig(output_dir=tmp_dir, per_device_train_batch_size=4, max_steps=1, report_to=[],
                           use_cpu=True, save_strategy="no", max_length=64, seed=0, optim="sgd", learning_rate=0.1,
                           disable_tqdm=True, bf16=False, logging_steps=1)
    import copy

    trainer = FastKTOTrainer(model=model, ref_model=copy.deepcopy(model), args=config, train_dataset=data,
                             processing_class=tok)
    with HeadFlops() as counter:
        trainer.train()
    vocab, dim = model.lm_head.weight.shape
    forward_tokens = sum(c[2] for c in counter.calls if c[2] >= 0)
    return {"flops": counter.flops, "head_calls": [c[0] for c in counter.calls],
            "scored_tokens_over_forward_calls": forward_tokens,
            "units_2DV_per_scored_token": counter.flops / (2 * dim * vocab * max(forward_tokens, 1))}


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_flops")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-trainer", action="store_true", help="only the adapter's calls")
    args = parser.parse_args(argv)
    import fastkto

    result = {"fastkto": fastkto.__file__, "torch": torch.__version__, "machine": platform.machine(),
              "adapter_calls": adapter_calls()}
    if not args.no_trainer:
        with tempfile.TemporaryDirectory() as tmp:
            result["fast_kto_trainer_step"] = trainer_step(tmp)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
