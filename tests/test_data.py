"""fastkto.data: loading, the hh-rlhf prompt split, tokenization, the collators' shift, masks and KL pairs."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import string
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="fastkto.data's loaders need the datasets package")
transformers = pytest.importorskip("transformers", reason="tokenization tests need transformers")

from fastkto import data as D  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
HH_SHA256 = "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF (``fastkto.assets.find_smollm2_gguf``), or skip."""
    from fastkto.assets import SMOLLM2_INSTALL, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip(f"needs the SmolLM2-135M-Instruct GGUF: {SMOLLM2_INSTALL}")
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    return str(gguf.parent), gguf.name


def make_char_tokenizer(chat_template: str | None = None):
    """A character-level fast tokenizer built offline (one token per printable character, plus specials)."""
    from tokenizers import Tokenizer, models

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


# --------------------------------------------------------------------------------------------------- transcripts
def test_split_prompt_keeps_the_marker_and_round_trips():
    t = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bye now"
    prompt, completion = D.split_prompt(t)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    assert completion == " bye now"
    assert prompt + completion == t
    with pytest.raises(ValueError, match="Assistant"):
        D.split_prompt("\n\nHuman: no answer")
    with pytest.raises(TypeError, match="transcript"):
        D.split_prompt(3)


def test_transcript_to_messages():
    msgs = D.transcript_to_messages("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:")
    assert msgs == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    assert D.transcript_to_messages("  plain question ") == [{"role": "user", "content": "plain question"}]
    conv = [{"role": "user", "content": "x"}]
    assert D.transcript_to_messages(conv) is conv
    with pytest.raises(TypeError, match="prompt"):
        D.transcript_to_messages(5)


# -------------------------------------------------------------------------------------------------------- loading
def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


KTO_ROWS = [
    {"prompt": "Q1?", "completion": " yes", "label": True},
    {"prompt": "Q2?", "completion": " no", "label": False},
    {"prompt": "Q3?", "completion": " maybe", "label": True},
]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.parquet"])
def test_load_kto_dataset_every_format(tmp_path, name):
    ds = D.load_kto_dataset(_write(tmp_path / name, KTO_ROWS))
    assert ds.to_list() == KTO_ROWS


def test_load_rejects_bad_paths_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.load_kto_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("prompt,completion,label\n")
    with pytest.raises(ValueError, match="must end in"):
        D.load_kto_dataset(tmp_path / "d.csv")
    no_label = _write(tmp_path / "nolabel.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match=r"missing \['label'\]"):
        D.load_kto_dataset(no_label)
    no_rejected = _write(tmp_path / "paired.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match=r"missing \['rejected'\]"):
        D.load_paired_dataset(no_rejected)


def test_load_rejects_empty_completions_and_bad_labels(tmp_path):
    empty = _write(tmp_path / "e.jsonl", [{"prompt": "a", "completion": "  ", "label": True}])
    with pytest.raises(ValueError, match="empty completion at row 0"):
        D.load_kto_dataset(empty)
    empty_pair = _write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x", "rejected": ""}])
    with pytest.raises(ValueError, match="'rejected' has an empty completion"):
        D.load_paired_dataset(empty_pair)
    bad = _write(tmp_path / "b.jsonl", [{"prompt": "a", "completion": "b", "label": 2}])
    with pytest.raises(ValueError, match="label"):
        D.load_kto_dataset(bad)
    ints = D.load_kto_dataset(_write(tmp_path / "i.jsonl", [{"prompt": "a", "completion": "b", "label": 1},
                                                            {"prompt": "a", "completion": "c", "label": 0}]))
    assert ints["label"] == [True, False]


def test_shipped_hh_copy_is_intact_and_splits():
    assert hashlib.sha256(HH_FILE.read_bytes()).hexdigest() == HH_SHA256
    raw = D.load_local_dataset(HH_FILE)
    assert len(raw) == 2312
    ds = D.load_paired_dataset(HH_FILE)
    # 5 pairs whose prompts differ and 4 with an empty chosen completion are dropped (counted independently here)
    split = [(D.split_prompt(r["chosen"]), D.split_prompt(r["rejected"])) for r in raw]
    differ = sum(pc != pr for (pc, _), (pr, _) in split)
    empty = sum((not c.strip() or not r.strip()) for (pc, c), (pr, r) in split if pc == pr)
    assert (differ, empty) == (5, 4)
    assert len(ds) == 2312 - differ - empty
    for row in ds.select(range(0, len(ds), 97)):
        assert row["prompt"].endswith(D.ASSISTANT) and row["prompt"].startswith(D.HUMAN)
        assert D.ASSISTANT not in row["chosen"] and row["chosen"].strip()
    with pytest.raises(ValueError, match="5 pairs have different"):
        D.split_hh_transcripts(raw, on_prompt_mismatch="error")
    with pytest.raises(ValueError, match="on_prompt_mismatch"):
        D.split_hh_transcripts(raw, on_prompt_mismatch="keep")


def test_paired_to_kto():
    paired = datasets.Dataset.from_list([{"prompt": "p1", "chosen": "a", "rejected": "b"},
                                         {"prompt": "p2", "chosen": "c", "rejected": "d"}])
    kto = D.paired_to_kto(paired)
    assert kto.to_list() == [
        {"prompt": "p1", "completion": "a", "label": True},
        {"prompt": "p2", "completion": "c", "label": True},
        {"prompt": "p1", "completion": "b", "label": False},
        {"prompt": "p2", "completion": "d", "label": False},
    ]


# --------------------------------------------------------------------------------------------------- tokenization
def test_tokenize_with_chat_template_turns_hh_into_messages():
    tok = make_char_tokenizer(CHAT_TEMPLATE)
    prompt = "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant:"
    p, c = D.tokenize_prompt_completion(tok, prompt, " fine")
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
         {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "fine"}],
        tokenize=True, return_dict=False,
    )
    assert p + c == list(expected)
    assert tok.decode(c, skip_special_tokens=False).replace(" ", "") == "fine<|im_end|>\n"
    assert tok.decode(p).replace(" ", "").endswith("<|im_start|>assistant\n")


def test_tokenize_plain_concatenation_appends_eos():
    tok = make_char_tokenizer()
    p, c = D.tokenize_prompt_completion(tok, "Q:", " ab")
    assert p == tok("Q:").input_ids
    assert c == tok(" ab", add_special_tokens=False).input_ids + [tok.eos_token_id]
    with pytest.raises(ValueError, match="empty completion"):
        D.tokenize_prompt_completion(tok, "Q:", "   ")
    with pytest.raises(ValueError, match="chat template"):
        D.tokenize_prompt_completion(tok, "Q:", "a", chat_template=True)


def test_tokenize_datasets():
    tok = make_char_tokenizer(CHAT_TEMPLATE)
    kto = D.tokenize_kto(datasets.Dataset.from_list(KTO_ROWS), tok)
    assert set(kto.column_names) == {"prompt_ids", "completion_ids", "label"}
    assert kto["label"] == [True, False, True]
    paired = D.tokenize_paired(datasets.Dataset.from_list([{"prompt": "Q?", "chosen": "a", "rejected": "bc"}]), tok)
    row = paired[0]
    assert len(row["rejected_ids"]) == len(row["chosen_ids"]) + 1


# ------------------------------------------------------------------------------------------------------ collators
def _random_examples(n, rng, vocab=50):
    return [
        {"prompt_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(1, 7))],
         "completion_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))],
         "label": rng.random() < 0.5}
        for _ in range(n)
    ]


def _check_rows(batch, prefix, pairs, pad):
    """Every row is prompt + completion, right-padded; labels[t] = input_ids[t + 1] on completion tokens only."""
    ids, mask, labels = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"]
    for b, (prompt, completion) in enumerate(pairs):
        seq = prompt + completion
        n = len(seq)
        assert ids[b, :n].tolist() == seq and (ids[b, n:] == pad).all()
        assert mask[b, :n].tolist() == [1] * n and (mask[b, n:] == 0).all()
        expected = [-100] * ids.shape[1]
        for t in range(len(prompt) - 1, n - 1):
            expected[t] = seq[t + 1]
        assert labels[b].tolist() == expected
        assert int((labels[b] != -100).sum()) == len(completion)


def test_kto_collator_shift_masks_and_kl_pairs(seed):
    rng = random.Random(seed)
    examples = _random_examples(5, rng)
    batch = D.KTOCollator(pad_token_id=0)(examples)
    assert all(batch[k].dtype == torch.long for k in batch if k != "desirable")
    assert batch["desirable"].dtype == torch.bool
    assert batch["desirable"].tolist() == [e["label"] for e in examples]
    _check_rows(batch, "", [(e["prompt_ids"], e["completion_ids"]) for e in examples], 0)
    kl_pairs = [(examples[i]["prompt_ids"], examples[(i + 1) % 5]["completion_ids"]) for i in range(5)]
    _check_rows(batch, "kl_", kl_pairs, 0)


def test_kto_collator_labels_align_with_a_causal_lm_loss(seed):
    """The shifted labels score exactly the completion tokens a causal LM's own (internally shifted) loss scores."""
    rng = random.Random(seed)
    examples = _random_examples(3, rng)
    batch = D.KTOCollator(pad_token_id=0, kl=False)(examples)
    logits = torch.randn(*batch["input_ids"].shape, 50, dtype=torch.float64)
    ours = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    ours = (ours * (batch["labels"] != -100)).sum(-1)
    for b, e in enumerate(examples):
        start = len(e["prompt_ids"])
        seq = e["prompt_ids"] + e["completion_ids"]
        want = sum(torch.log_softmax(logits[b, t - 1], -1)[seq[t]] for t in range(start, len(seq)))
        torch.testing.assert_close(ours[b], want, rtol=0, atol=1e-12)  # same float64 terms, summed in another order


def test_collator_truncation():
    ex = [{"prompt_ids": [1, 2, 3, 4, 5], "completion_ids": [6, 7, 8], "label": True},
          {"prompt_ids": [9], "completion_ids": [10, 11], "label": False}]
    batch = D.KTOCollator(pad_token_id=0, max_length=5, max_prompt_length=3, kl=False)(ex)
    # prompt keeps its last 3 tokens, then the sequence its first 5 (the completion loses its end)
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6, 7], [9, 10, 11, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, -100], [10, 11, -100, -100, -100]]
    padded = D.KTOCollator(pad_token_id=0, pad_to_multiple_of=4, kl=False)(ex)
    assert padded["input_ids"].shape == (2, 8)


def test_collator_errors():
    ex = [{"prompt_ids": [1, 2, 3, 4], "completion_ids": [5], "label": True},
          {"prompt_ids": [6], "completion_ids": [7], "label": False}]
    with pytest.raises(ValueError, match="labels would be all masked"):
        D.KTOCollator(pad_token_id=0, max_length=4, kl=False)(ex)
    with pytest.raises(ValueError, match="at least 2 examples"):
        D.KTOCollator(pad_token_id=0)(ex[:1])
    assert D.KTOCollator(pad_token_id=0, kl=False)(ex[:1])["labels"].tolist() == [[-100, -100, -100, 5, -100]]
    with pytest.raises(ValueError, match="empty completion_ids"):
        D.KTOCollator(pad_token_id=0, kl=False)([{"prompt_ids": [1], "completion_ids": [], "label": True}])
    with pytest.raises(ValueError, match="empty prompt_ids"):
        D.KTOCollator(pad_token_id=0, kl=False)([{"prompt_ids": [], "completion_ids": [2], "label": True}])
    with pytest.raises(ValueError, match="no 'completion_ids' key"):
        D.KTOCollator(pad_token_id=0, kl=False)([{"prompt_ids": [1], "label": True}])
    with pytest.raises(ValueError, match="empty batch"):
        D.KTOCollator(pad_token_id=0)([])
    with pytest.raises(ValueError, match="max_length"):
        D.KTOCollator(pad_token_id=0, max_length=1)
    with pytest.raises(ValueError, match="max_prompt_length"):
        D.PairedCollator(pad_token_id=0, max_prompt_length=0)
    with pytest.raises(TypeError, match="pad_token_id"):
        D.PairedCollator(pad_token_id=None)


def test_paired_collator_layout(seed):
    rng = random.Random(seed)
    pairs = [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["completion_ids"],
              "rejected_ids": [rng.randrange(3, 50) for _ in range(rng.randint(1, 6))]}
             for e in _random_examples(3, rng)]
    batch = D.PairedCollator(pad_token_id=1)(pairs)
    assert batch["input_ids"].shape[0] == 6
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    _check_rows(batch, "", rows, 1)


def test_hh_with_a_real_chat_template_tokenizer():
    """hh-rlhf through SmolLM2's own chat template (GGUF tokenizer, offline): prompts end in the assistant cue."""
    folder, name = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ds = D.load_paired_dataset(HH_FILE).select(range(4))
    tokenized = D.tokenize_paired(ds, tok)
    for row, raw in zip(tokenized, ds):
        assert tok.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
        assert tok.decode(row["chosen_ids"]) == raw["chosen"].strip() + "<|im_end|>\n"
    batch = D.KTOCollator(pad_token_id=tok.pad_token_id, max_length=512)(
        [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": True} for r in tokenized]
    )
    assert int((batch["labels"] != -100).sum()) == sum(len(r["chosen_ids"]) for r in tokenized)


# ------------------------------------------------------------------------------------ issue 13: labels and errors
@pytest.mark.parametrize("bad", ["False", "True", 2, -1, 0.0, None, [True]])
def test_kto_collator_checks_labels_like_the_loaders(bad):
    """bool("False") is True: the collator used to turn the string "False" into a desirable example."""
    ex = [{"prompt_ids": [1], "completion_ids": [2], "label": True},
          {"prompt_ids": [3], "completion_ids": [4], "label": bad}]
    with pytest.raises(ValueError, match=r"example 1: label must be bool \(True = desirable\) or 0/1"):
        D.KTOCollator(pad_token_id=0, kl=False)(ex)


def test_kto_collator_accepts_bool_and_0_1_labels():
    import numpy as np

    ex = [{"prompt_ids": [1], "completion_ids": [2], "label": label}
          for label in (True, False, 1, 0, np.bool_(True), np.int64(0), torch.tensor(True))]
    assert D.KTOCollator(pad_token_id=0, kl=False)(ex)["desirable"].tolist() == [True, False, True, False, True,
                                                                                 False, True]


def test_shift_labels_is_the_collators_shift(seed):
    """shift_labels(input_ids, completion_mask): labels[t] = input_ids[t + 1] where token t + 1 is a completion
    token, ignore_index elsewhere (the last position predicts nothing): exactly the collators' labels."""
    import fastkto

    rng = random.Random(seed)
    examples = _random_examples(4, rng)
    batch = D.KTOCollator(pad_token_id=0, kl=False)(examples)
    completion_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e["prompt_ids"])
        completion_mask[b, n : n + len(e["completion_ids"])] = True
    assert torch.equal(batch["completion_mask"].bool(), completion_mask)
    labels = D.shift_labels(batch["input_ids"], completion_mask)
    assert labels.dtype == torch.long and torch.equal(labels, batch["labels"])
    assert fastkto.shift_labels is D.shift_labels and "shift_labels" in D.__all__ and "shift_labels" in fastkto.__all__
    # an int 0/1 mask (TRL's completion_mask) and another ignore_index
    other = D.shift_labels(batch["input_ids"], completion_mask.long(), ignore_index=-1)
    assert torch.equal(other, batch["labels"].masked_fill(batch["labels"] == -100, -1))
    with pytest.raises(ValueError, match=r"completion_mask must have input_ids' shape"):
        D.shift_labels(batch["input_ids"], completion_mask[:, 1:])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        D.shift_labels(batch["input_ids"].float(), completion_mask)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\)"):
        D.shift_labels(batch["input_ids"][0], completion_mask[0])


def test_collator_labels_never_look_unshifted_and_input_ids_do(seed):
    """The evidence the losses warn on (issue 22): shifted labels, from the collators (padded and packed, KL rows
    too) and from shift_labels, never score a sequence's last position; input_ids used as labels score all of them.
    Checked on random batches of several seeds' lengths, so the rule is not an accident of one layout."""
    from fastkto.labels import looks_unshifted

    rng = random.Random(seed)
    for _ in range(5):
        examples = _random_examples(rng.randint(2, 6), rng)
        padded = D.KTOCollator(pad_token_id=0)(examples)
        packed = D.KTOCollator(pad_token_id=0, packed=True)(examples)
        for prefix in ("", "kl_"):
            assert not looks_unshifted(padded[f"{prefix}labels"])
            lengths = torch.diff(packed[f"{prefix}cu_seqlens"])
            assert not looks_unshifted(packed[f"{prefix}labels"], lengths=lengths)
            assert looks_unshifted(packed[f"{prefix}input_ids"], lengths=lengths)  # every row's last token scored
        assert looks_unshifted(padded["input_ids"])  # pad id 0 is a valid token: every position is "scored"
        assert not looks_unshifted(D.shift_labels(padded["input_ids"], padded["completion_mask"]))
    assert not looks_unshifted(torch.zeros(0, 4, dtype=torch.long))


def test_data_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="pad_token_id must be an int.*tokenizer.eos_token_id"):
        D.KTOCollator(pad_token_id=None)
    # a hub name is not a file: say that only local files are read
    with pytest.raises(FileNotFoundError, match="local files only.*datasets.load_dataset"):
        D.load_kto_dataset("trl-lib/kto-mix-14k")
    with pytest.raises(FileNotFoundError, match="local files only"):
        D.load_paired_dataset("Anthropic/hh-rlhf")
    # without the datasets package: name the extra that installs it
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    path = _write(tmp_path / "d.jsonl", KTO_ROWS)
    with pytest.raises(ImportError, match=r'pip install "fastkto\[hf\]"'):
        D.load_kto_dataset(path)
    with pytest.raises(ImportError, match=r'pip install "fastkto\[hf\]"'):
        D.paired_to_kto(None)
