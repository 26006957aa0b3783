"""KTO and paired preference data: loading, hh-rlhf prompt splitting, tokenization, and the collators.

Two data formats, as in TRL:

* KTO (unpaired): columns ``prompt`` (str), ``completion`` (str), ``label`` (bool: True = desirable).
* Paired: columns ``prompt``, ``chosen``, ``rejected`` (str). hh-rlhf style files hold only ``chosen`` and
  ``rejected`` whole transcripts; ``split_hh_transcripts`` cuts the prompt off them.

Pipeline: ``load_kto_dataset`` / ``load_paired_dataset`` (local jsonl, jsonl.gz, json or parquet files, read with
``datasets``) -> optionally ``paired_to_kto`` -> ``tokenize_kto`` / ``tokenize_paired`` (``prompt_ids`` plus
``completion_ids`` or ``chosen_ids`` / ``rejected_ids``) -> ``KTOCollator`` / ``PairedCollator`` (padded tensors).

The shift. fastkto scores ``labels[t]`` from ``hidden[t]`` and shifts nothing. A causal LM's hidden state at
position t predicts token t + 1, so the collators shift once, here: ``labels[b, t] = input_ids[b, t + 1]`` when
token t + 1 belongs to the completion, and ``-100`` otherwise (prompt, padding, and the last position, which
predicts nothing). ``hidden = backbone(input_ids)`` of shape (B, T, D) and ``labels`` of shape (B, T) then line up
with no slicing. ``shift_labels(input_ids, completion_mask)`` is that shift on its own, for batches built elsewhere
(TRL's collators return ``input_ids`` and ``completion_mask``).

``datasets`` is needed only by the loading and tokenizing functions; the collators need only torch.
"""

from __future__ import annotations

import logging
import operator
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import packing
from ._checks import check_bool, check_count, check_int, check_integer_tensor
from .value_checks import host_reads_allowed

__all__ = [
    "HUMAN",
    "ASSISTANT",
    "split_prompt",
    "transcript_to_messages",
    "load_local_dataset",
    "load_kto_dataset",
    "load_paired_dataset",
    "split_hh_transcripts",
    "paired_to_kto",
    "tokenize_prompt_completion",
    "tokenize_kto",
    "tokenize_paired",
    "shift_labels",
    "KTOCollator",
    "PairedCollator",
    "TokenBudgetSampler",
]

logger = logging.getLogger(__name__)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
IGNORE_INDEX = -100
KTO_COLUMNS = ("prompt", "completion", "label")
PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
_TURN = re.compile(r"\n\n(Human|Assistant):")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ----------------------------------------------------------------------------------------------------- transcripts
def split_prompt(transcript: str) -> tuple[str, str]:
    """Split an hh-rlhf transcript into (prompt, completion) at its last "\\n\\nAssistant:".

    The prompt keeps the marker (it is the text up to and including the last "\\n\\nAssistant:"); the completion is
    the rest, leading space included, so ``prompt + completion == transcript``.
    """
    if not isinstance(transcript, str):
        raise TypeError(f"transcript must be a str, got {type(transcript).__name__}")
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"transcript has no {ASSISTANT!r} turn to split at: {transcript[:80]!r}...")
    cut += len(ASSISTANT)
    return transcript[:cut], transcript[cut:]


def transcript_to_messages(prompt: str | list) -> list[dict[str, str]]:
    """Chat messages of a prompt: hh-rlhf turns become user / assistant messages, any other text one user message.

    A list of ``{"role", "content"}`` dicts (a conversational prompt) is returned unchanged. The trailing empty
    "\\n\\nAssistant:" turn of an hh-rlhf prompt is the generation cue: it is dropped (the chat template's
    ``add_generation_prompt`` renders it). Contents are stripped of surrounding whitespace.
    """
    if isinstance(prompt, list):
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str or a list of messages, got {type(prompt).__name__}")
    parts = _TURN.split(prompt)
    # parts = [text before the first marker, role, content, role, content, ...]
    if len(parts) == 1:
        return [{"role": "user", "content": prompt.strip()}]
    head = parts[0].strip()
    messages = [{"role": "user", "content": head}] if head else []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


# --------------------------------------------------------------------------------------------------------- loading
def _datasets():
    """The ``datasets`` package, or an ImportError that says how to install it (it is an optional dependency)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            'fastkto.data\'s loaders need the datasets package: pip install "fastkto[hf]" (or pip install datasets); '
            "the collators and shift_labels need only torch"
        ) from err
    return datasets


def load_local_dataset(path: str | os.PathLike):
    """A ``datasets.Dataset`` from one local file: .jsonl, .jsonl.gz, .json, .json.gz or .parquet."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data file not found: {path!r}. fastkto.data reads local files only (nothing is downloaded); for a "
            "dataset on a hub, load it with datasets.load_dataset(name, split=...) and pass that Dataset to "
            "tokenize_kto / tokenize_paired (or paired_to_kto)"
        )
    datasets = _datasets()
    stem = path[:-3] if path.endswith(".gz") else path
    fmt = _FORMATS.get(os.path.splitext(stem)[1])
    if fmt is None or (fmt == "parquet" and path.endswith(".gz")):
        raise ValueError(f"path must end in .jsonl, .jsonl.gz, .json, .json.gz or .parquet, got {path}")
    return datasets.load_dataset(fmt, data_files=path, split="train")


def _require_columns(dataset, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{what} needs columns {list(columns)}; missing {missing} (found {dataset.column_names})")


def _check_texts(dataset, column: str, *, allow_messages: bool = False) -> None:
    for i, text in enumerate(dataset[column]):
        if allow_messages and isinstance(text, list):
            continue
        if not isinstance(text, str):
            raise TypeError(f"column {column!r} must hold strings; row {i} is {type(text).__name__}")
        if column != "prompt" and not text.strip():
            raise ValueError(f"column {column!r} has an empty completion at row {i}")


def _as_label(value) -> bool | None:
    """A KTO label as a bool: True / False, 0 / 1 (Python, NumPy or a one-element torch tensor); None if it is
    anything else. Never ``bool(x)``: that makes the string "False" desirable."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex:
            return None
        value = value.item()
    elif type(value).__module__ == "numpy" and hasattr(value, "item"):  # NumPy scalars (np.bool_, np.int64)
        value = value.item()
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    return None


def _check_kto(dataset):
    _require_columns(dataset, KTO_COLUMNS, "KTO data")
    _check_texts(dataset, "prompt", allow_messages=True)
    _check_texts(dataset, "completion")
    labels = dataset["label"]
    for i, label in enumerate(labels):
        if _as_label(label) is None:
            raise ValueError(f"column 'label' must be bool (True = desirable) or 0/1; row {i} is {label!r}")
    if not all(isinstance(label, bool) for label in labels):
        dataset = dataset.map(lambda row: {"label": bool(row["label"])})
    return dataset


def load_kto_dataset(path: str | os.PathLike):
    """Unpaired KTO data from a local file; checks the columns (prompt, completion, label) and their values.

    Raises ValueError for missing columns, empty completions and labels that are not bool or 0/1 (0/1 become
    bool).
    """
    return _check_kto(load_local_dataset(path))


def load_paired_dataset(path: str | os.PathLike, *, on_prompt_mismatch: str = "drop"):
    """Paired data (prompt, chosen, rejected) from a local file.

    A file with only ``chosen`` and ``rejected`` transcripts (hh-rlhf) goes through ``split_hh_transcripts``
    (``on_prompt_mismatch`` is passed on). Raises ValueError for missing columns and empty completions.
    """
    dataset = load_local_dataset(path)
    if "prompt" not in dataset.column_names and {"chosen", "rejected"} <= set(dataset.column_names):
        dataset = split_hh_transcripts(dataset, on_prompt_mismatch=on_prompt_mismatch)
    _require_columns(dataset, PAIRED_COLUMNS, "paired data")
    _check_texts(dataset, "prompt", allow_messages=True)
    _check_texts(dataset, "chosen")
    _check_texts(dataset, "rejected")
    return dataset


def split_hh_transcripts(dataset, *, on_prompt_mismatch: str = "drop"):
    """(chosen, rejected) transcripts -> (prompt, chosen, rejected), cutting at each one's last "\\n\\nAssistant:".

    In a few pairs the two transcripts differ before that point (in hh-rlhf harmless-base test: 5 of 2,312; the
    chosen side holds a malformed turn), so there is no common prompt and the preference does not compare two
    answers to one context. ``on_prompt_mismatch="drop"`` (default) leaves those pairs out and logs how many;
    ``"error"`` raises ValueError. Pairs whose chosen or rejected completion is empty (4 chosen ones in that file)
    are dropped the same way, since an empty completion has no token to score.
    """
    if on_prompt_mismatch not in ("drop", "error"):
        raise ValueError(f"on_prompt_mismatch must be 'drop' or 'error', got {on_prompt_mismatch!r}")
    _require_columns(dataset, ("chosen", "rejected"), "hh-rlhf transcripts")

    def split(row):
        prompt, chosen = split_prompt(row["chosen"])
        other, rejected = split_prompt(row["rejected"])
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "_same": prompt == other}

    dataset = dataset.map(split, remove_columns=dataset.column_names)
    mismatched = [i for i, same in enumerate(dataset["_same"]) if not same]
    if mismatched and on_prompt_mismatch == "error":
        raise ValueError(f"{len(mismatched)} pairs have different chosen / rejected prompts (rows {mismatched[:10]})")
    keep = [
        i
        for i, (same, c, r) in enumerate(zip(dataset["_same"], dataset["chosen"], dataset["rejected"]))
        if same and c.strip() and r.strip()
    ]
    dropped = len(dataset) - len(keep)
    if dropped:
        logger.info(
            "split_hh_transcripts: dropped %d of %d pairs (%d with different prompts, %d with an empty completion)",
            dropped, len(dataset), len(mismatched), dropped - len(mismatched),
        )
    return dataset.select(keep).remove_columns("_same")


def paired_to_kto(dataset):
    """Paired -> unpaired KTO data: each chosen completion a desirable row, each rejected one undesirable.

    Output rows: all chosen first (label True), then all rejected (label False), each keeping its prompt, so the
    same prompt appears twice. Shuffle before batching: the KTO KL pairs (prompt i with completion i + 1) are only
    mismatched when neighbours come from different prompts.
    """
    datasets = _datasets()
    _require_columns(dataset, PAIRED_COLUMNS, "paired data")
    n = len(dataset)
    return datasets.Dataset.from_dict(
        {
            "prompt": list(dataset["prompt"]) * 2,
            "completion": list(dataset["chosen"]) + list(dataset["rejected"]),
            "label": [True] * n + [False] * n,
        }
    )


# ---------------------------------------------------------------------------------------------------- tokenization
def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def tokenize_prompt_completion(
    tokenizer, prompt: str | list, completion: str, *, chat_template: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its completion, such that prompt_ids + completion_ids is the training sequence.

    With a chat template (``chat_template=None`` means: when the tokenizer has one), the prompt becomes messages
    (``transcript_to_messages``), the completion one assistant message; the sequence is the template's rendering of
    all messages, and the prompt the rendering with ``add_generation_prompt=True``. If that is not a prefix of the
    sequence (a template that renders the last turn differently), the prompt is cut where they diverge, so the
    sequence is always the full rendering. Without a template: ``tokenizer(prompt)`` (with the tokenizer's special
    tokens, e.g. BOS) and ``tokenizer(completion, add_special_tokens=False)`` plus EOS when the tokenizer has one.

    Raises ValueError when the completion has no token.
    """
    check_bool("chat_template", chat_template, optional=True)
    use_template = _has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_template:
        if not _has_chat_template(tokenizer):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        messages = transcript_to_messages(prompt)
        answer = {"role": "assistant", "content": completion.strip()}
        prompt_ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        full_ids = _ids(tokenizer.apply_chat_template(messages + [answer], tokenize=True))
        cut = 0
        limit = min(len(prompt_ids), len(full_ids))
        while cut < limit and prompt_ids[cut] == full_ids[cut]:
            cut += 1
        prompt_ids, completion_ids = full_ids[:cut], full_ids[cut:]
    else:
        if isinstance(prompt, list):
            raise ValueError("a conversational prompt (list of messages) needs a tokenizer with a chat template")
        prompt_ids = _ids(tokenizer(prompt))
        completion_ids = _ids(tokenizer(completion, add_special_tokens=False))
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and (not completion_ids or completion_ids[-1] != eos):
            completion_ids.append(int(eos))
    if not completion_ids or not completion.strip():
        raise ValueError(f"completion {completion[:40]!r} has no token to score (empty completion)")
    return prompt_ids, completion_ids


def tokenize_kto(dataset, tokenizer, *, chat_template: bool | None = None, num_proc: int | None = None):
    """KTO data -> columns ``prompt_ids``, ``completion_ids`` (lists of int) and ``label`` (bool)."""
    dataset = _check_kto(dataset)

    def fn(row):
        p, c = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"], chat_template=chat_template)
        return {"prompt_ids": p, "completion_ids": c}

    keep = ("label",)
    return dataset.map(fn, remove_columns=[c for c in dataset.column_names if c not in keep], num_proc=num_proc)


def tokenize_paired(dataset, tokenizer, *, chat_template: bool | None = None, num_proc: int | None = None):
    """Paired data -> columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.

    The prompt ids are the chosen sequence's; with a chat template that renders the prompt the same way before
    either answer (any template whose prompt is a prefix of the full rendering) they are the rejected one's too,
    which is checked.
    """
    _require_columns(dataset, PAIRED_COLUMNS, "paired data")

    def fn(row):
        p, c = tokenize_prompt_completion(tokenizer, row["prompt"], row["chosen"], chat_template=chat_template)
        p2, r = tokenize_prompt_completion(tokenizer, row["prompt"], row["rejected"], chat_template=chat_template)
        if p2 != p:
            raise ValueError(f"prompt {str(row['prompt'])[:60]!r} tokenizes differently before chosen and rejected")
        return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}

    return dataset.map(fn, remove_columns=dataset.column_names, num_proc=num_proc)


# ------------------------------------------------------------------------------------------------------- the shift
def shift_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
                 ) -> torch.Tensor:
    """Labels aligned with a causal LM's hidden states: ``labels[b, t]`` is the token ``hidden[b, t]`` predicts.

    fastkto's core (``fused_logprobs``, ``sequence_logps``) and the losses (``KTOLoss``, ``DPOLoss``) score
    ``labels[t]`` from ``hidden[t]`` and shift nothing, while a causal LM's hidden state at position t predicts
    token t + 1. So ``labels[b, t] = input_ids[b, t + 1]`` where token t + 1 is a completion token, and
    ``ignore_index`` elsewhere (prompt, padding, and the last position, which predicts nothing). Passing
    ``input_ids`` (or HF-style labels) as labels instead would score every token from its own hidden state.

    Args:
        input_ids: (B, T) integer token ids, as fed to the model.
        completion_mask: (B, T) bool or 0/1 integer: 1 on the completion tokens (the ones to score), 0 on prompt
            and padding (TRL's ``completion_mask``; the collators here return it too). Column 0 is never scored:
            no hidden state predicts a row's first token (a completion needs at least one prompt token, e.g. BOS).
        ignore_index: the label of unscored positions (-100, as everywhere in fastkto and transformers); a value
            >= 0 that equals a scored token's id raises ValueError (that token would silently go unscored).

    Returns:
        (B, T) int64 labels on input_ids' device, to pair with ``hidden_states(model, input_ids)`` of shape
        (B, T, D) without any slicing.
    """
    check_integer_tensor("input_ids", input_ids, "token ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    if not isinstance(completion_mask, torch.Tensor) or tuple(completion_mask.shape) != tuple(input_ids.shape):
        got = tuple(completion_mask.shape) if isinstance(completion_mask, torch.Tensor) else type(completion_mask)
        raise ValueError(f"completion_mask must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
    check_int("ignore_index", ignore_index)
    labels = torch.full(input_ids.shape, ignore_index, dtype=torch.long, device=input_ids.device)
    scored = completion_mask[:, 1:].to(device=input_ids.device) != 0
    # a non-negative ignore_index may be a real token id: that token would drop out of the loss unseen
    if ignore_index >= 0 and host_reads_allowed(input_ids) \
            and bool((scored & (input_ids[:, 1:] == ignore_index)).any()):
        raise ValueError(f"ignore_index={ignore_index} is the id of a scored token in input_ids, which would be "
                         f"left out of the loss; use an ignore_index outside the vocabulary (-100)")
    labels[:, :-1] = torch.where(scored, input_ids[:, 1:].long(), ignore_index)
    return labels


# ------------------------------------------------------------------------------------------------------- collation
@dataclass
class _Truncation:
    """Shared sequence building: truncation, the shift, padding."""

    pad_token_id: int
    max_length: int | None = None
    max_prompt_length: int | None = None
    pad_to_multiple_of: int | None = None
    packed: bool = False

    def __post_init__(self):
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            hint = (" (the tokenizer has no pad token: pass pad_token_id=tokenizer.eos_token_id; padded positions "
                    "are masked out of attention and labels, so EOS is safe)") if self.pad_token_id is None else ""
            raise TypeError(f"pad_token_id must be an int, got {self.pad_token_id!r}{hint}")
        if self.pad_token_id < 0:  # fed to the model's embedding as an index: -100 belongs in labels only
            raise ValueError(f"pad_token_id must be >= 0 (a token id the model can embed), got {self.pad_token_id}")
        check_count("max_length", self.max_length, optional=True)
        check_count("max_prompt_length", self.max_prompt_length, optional=True)
        check_count("pad_to_multiple_of", self.pad_to_multiple_of, optional=True)
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(
                f"max_length must be >= 2 (one prompt token and one completion token), got {self.max_length}"
            )
        if not isinstance(self.packed, bool):
            raise TypeError(f"packed must be a bool, got {type(self.packed).__name__}")
        if self.packed and self.pad_to_multiple_of is not None:
            raise ValueError("pad_to_multiple_of does not apply to packed batches (packed=True has no padding)")

    def sequence(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], where: str,
                 completion_key: str = "completion_ids") -> tuple[list, int]:
        """(token ids, prompt length) after truncation: the prompt keeps its last ``max_prompt_length`` tokens, then
        the sequence keeps its first ``max_length`` tokens (the completion loses its end). ``completion_key`` names
        the completion in errors."""
        prompt = _token_ids(prompt_ids, where, "prompt_ids")
        completion = _token_ids(completion_ids, where, completion_key)
        if not prompt:
            raise ValueError(f"{where}: empty prompt_ids; the first completion token needs a token before it (BOS)")
        if not completion:
            raise ValueError(f"{where}: empty completion_ids; there is nothing to score")
        if self.max_prompt_length is not None:
            prompt = prompt[-self.max_prompt_length :]
        ids = (prompt + completion)[: self.max_length]
        if len(ids) <= len(prompt):
            raise ValueError(
                f"{where}: labels would be all masked: the prompt has {len(prompt)} tokens and max_length is "
                f"{self.max_length}, so truncation leaves no completion token. Raise max_length, set a smaller "
                "max_prompt_length, or filter such examples out."
            )
        return ids, len(prompt)

    def batch(self, rows: list[tuple[list, int]]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask, completion_mask and shifted labels (B, T), int64."""
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (ids, n_prompt) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, : len(ids)] = 1
            completion_mask[b, n_prompt : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
                "labels": shift_labels(input_ids, completion_mask)}

    def collate(self, rows: list[tuple[list, int]]) -> dict[str, torch.Tensor]:
        """``batch(rows)``, or with ``packed``, that batch with its padding removed (``packed_batch``)."""
        return self.packed_batch(rows) if self.packed else self.batch(rows)

    def packed_batch(self, rows: list[tuple[list, int]]) -> dict[str, torch.Tensor]:
        """The rows concatenated: input_ids, position_ids (restarting at 0 for each row), completion_mask and
        labels (1, T_total) int64, and cu_seqlens (B + 1,) int32 (``fastkto.packing``). No attention_mask: a
        transformers model given position_ids and no mask keeps the rows apart (``hidden_states`` checks it).

        The labels are the padded batch's (``shift_labels`` on each padded row, so no shift crosses from one row
        into the next) with the padding removed: each row's last token scores nothing.
        """
        padded = self.batch(rows)
        cu_seqlens, position_ids, input_ids, completion_mask, labels = packing.pack_padded(
            padded["attention_mask"], padded["input_ids"], padded["completion_mask"], padded["labels"])
        return {"input_ids": input_ids, "position_ids": position_ids, "completion_mask": completion_mask,
                "labels": labels, "cu_seqlens": cu_seqlens}


def _token_ids(ids, where: str, key: str) -> list[int]:
    """``ids`` (a list of ints, a 1-d integer tensor or NumPy array) as a list of Python ints >= 0; TypeError /
    ValueError naming ``key`` otherwise (``torch.tensor`` would truncate 1.7 to 1 and a negative id reaches the
    embedding as an index)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{where}: {key} must be a sequence of ints (token ids), got {type(ids).__name__}")
    shape = getattr(ids, "shape", None)
    if shape is not None and len(shape) != 1:
        raise ValueError(f"{where}: {key} must be 1-d (one sequence of token ids), got shape {tuple(shape)}")
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{where}: {key} must hold ints (token ids), got a {ids.dtype} tensor")
        out = ids.tolist()
    else:
        out = []
        for token in ids:
            try:  # ints and NumPy integers; floats and nested lists have no __index__, and bool is refused
                if isinstance(token, bool):
                    raise TypeError
                out.append(operator.index(token))
            except TypeError:
                raise TypeError(f"{where}: {key} must hold ints (token ids), got {type(token).__name__} "
                                f"{token!r}") from None
    if out and min(out) < 0:
        raise ValueError(f"{where}: {key} must be token ids >= 0, got {min(out)}")
    return out


def _field(example: dict[str, Any], key: str, i: int):
    if key not in example:
        raise ValueError(f"example {i} has no {key!r} key (found {sorted(example)}); tokenize the data first")
    return example[key]


@dataclass
class KTOCollator(_Truncation):
    """Batches tokenized KTO examples (``prompt_ids``, ``completion_ids``, ``label``) for a causal LM.

    Args:
        pad_token_id: the id padding positions get in input_ids (they are masked out of attention and labels, so
            it may equal EOS).
        max_length: total tokens per sequence (prompt + completion), or None. The completion's end is cut.
        max_prompt_length: the prompt keeps its last this many tokens, or None.
        pad_to_multiple_of: pad the time dimension to a multiple of this.
        kl: also build the KL batch: prompt i with completion (i + 1) mod B (needs B >= 2). A cyclic shift like
            TRL's (which pairs prompt i with completion i - 1): the KL batch holds the batch's own completions,
            each under another example's prompt.

    Returns a dict of tensors: ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on completion tokens),
    ``labels`` (B, T) int64 (``shift_labels(input_ids, completion_mask)``: -100 on prompt, padding and the last
    position), ``desirable`` (B,) bool, and with ``kl``: ``kl_input_ids``, ``kl_attention_mask``,
    ``kl_completion_mask``, ``kl_labels`` (B, T') int64.

    Raises ValueError for a missing key, a label that is not bool or 0/1, an empty completion, a batch of one with
    ``kl``, or truncation that leaves a sequence no completion token; TypeError / ValueError for token ids that are
    not a 1-d sequence of ints >= 0 (lists, integer tensors and NumPy arrays are accepted).
    """

    kl: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_bool("kl", self.kl)

    def tokens(self, example: dict[str, Any]) -> int:
        """The tokens ``example`` takes in a batch after truncation (its KL pair takes about as many): what
        ``TokenBudgetSampler`` counts."""
        return len(self.sequence(_field(example, "prompt_ids", 0), _field(example, "completion_ids", 0), "example")[0])

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(examples)
        if n == 0:
            raise ValueError("cannot collate an empty batch")
        if self.kl and n < 2:
            raise ValueError(
                "KL estimation needs a batch of at least 2 examples: the KL pairs match prompt i with completion "
                "i + 1 of the same batch. Use a batch size >= 2, or kl=False (e.g. with a precomputed KL or z0 = 0)."
            )
        prompts = [_field(e, "prompt_ids", i) for i, e in enumerate(examples)]
        completions = [_field(e, "completion_ids", i) for i, e in enumerate(examples)]
        labels = [_as_label(_field(e, "label", i)) for i, e in enumerate(examples)]
        for i, label in enumerate(labels):
            if label is None:
                raise ValueError(
                    f"example {i}: label must be bool (True = desirable) or 0/1, got {examples[i]['label']!r}"
                )
        out = self.collate([self.sequence(p, c, f"example {i}") for i, (p, c) in enumerate(zip(prompts, completions))])
        out["desirable"] = torch.tensor(labels, dtype=torch.bool)
        if self.kl:
            kl_rows = [
                self.sequence(prompts[i], completions[(i + 1) % n], f"KL pair (prompt {i}, completion {(i + 1) % n})")
                for i in range(n)
            ]
            out.update({f"kl_{k}": v for k, v in self.collate(kl_rows).items()})
        return out


@dataclass
class PairedCollator(_Truncation):
    """Batches tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) for DPO.

    Same arguments and truncation as ``KTOCollator`` (without ``kl``). Returns ``input_ids``, ``attention_mask``,
    ``completion_mask``, ``labels`` of shape (2B, T): rows [0, B) the chosen sequences, rows [B, 2B) the rejected
    ones, in example order (the layout ``fastkto.loss.DPOLoss`` expects).
    """

    def tokens(self, example: dict[str, Any]) -> int:
        """The tokens ``example`` (both its sequences) takes in a batch after truncation (``TokenBudgetSampler``)."""
        prompt = _field(example, "prompt_ids", 0)
        return sum(len(self.sequence(prompt, _field(example, key, 0), key, key)[0])
                   for key in ("chosen_ids", "rejected_ids"))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows = []
        for key in ("chosen_ids", "rejected_ids"):
            for i, e in enumerate(examples):
                rows.append(self.sequence(_field(e, "prompt_ids", i), _field(e, key, i), f"example {i} ({key})", key))
        return self.collate(rows)


# --------------------------------------------------------------------------------------------------- token budget
class TokenBudgetSampler(torch.utils.data.Sampler):
    """Batches of example indices filled up to a token budget instead of a fixed number of rows.

    Packed batches cost what their tokens cost, so a fixed number of rows gives steps of very different sizes; this
    fills each batch greedily, in a (seeded, per-epoch) shuffled order, with examples while their tokens fit in
    ``max_tokens``. Pass it to ``torch.utils.data.DataLoader(dataset, batch_sampler=..., collate_fn=collator)``.

    Args:
        lengths: each example's tokens, e.g. ``[collator.tokens(e) for e in dataset]`` (a paired example counts both
            its sequences; a KTO example its own row, its KL pair adds about as many again).
        max_tokens: the budget of one batch (>= 1).
        shuffle: shuffle the order every epoch (``set_epoch``); else the dataset's order.
        seed: the shuffle's seed (epoch e uses seed + e).
        min_rows: the fewest examples a batch may hold (2 for KTO's KL pairs). Checked up front: the ``min_rows``
            longest examples must fit the budget together, so every batch can be closed at min_rows or more.
        drop_last: drop the epoch's last batch (always dropped when it holds fewer than ``min_rows`` examples).

    Raises ValueError for an example longer than ``max_tokens`` or a budget the ``min_rows`` longest cannot share.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0,
                 min_rows: int = 1, drop_last: bool = False):
        try:  # ints and NumPy integers; int(3.7) would count 3 tokens
            lengths = [operator.index(n) for n in lengths]
        except TypeError:
            raise TypeError("lengths must be ints (each example's token count, e.g. collator.tokens(example))"
                            ) from None
        check_count("max_tokens", max_tokens)
        check_count("min_rows", min_rows)
        check_bool("shuffle", shuffle)
        check_bool("drop_last", drop_last)
        check_int("seed", seed)
        if any(n < 1 for n in lengths):
            raise ValueError("lengths must all be >= 1 (an example takes at least one token)")
        if len(lengths) < min_rows:
            raise ValueError(f"{len(lengths)} examples cannot fill a batch of min_rows={min_rows}")
        longest = sorted(lengths, reverse=True)[:min_rows]
        if longest and longest[0] > max_tokens:
            raise ValueError(f"example {lengths.index(longest[0])} takes {longest[0]} tokens, more than "
                             f"max_tokens={max_tokens}; raise max_tokens or truncate (max_length)")
        if sum(longest) > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} cannot hold min_rows={min_rows} of the longest examples "
                             f"({sum(longest)} tokens); raise max_tokens")
        self.lengths, self.max_tokens, self.min_rows = lengths, max_tokens, min_rows
        self.shuffle, self.seed, self.drop_last, self.epoch = bool(shuffle), int(seed), bool(drop_last), 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shuffle (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        batches: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i in order:
            # a batch closed here holds min_rows examples or more: any min_rows examples fit the budget (checked
            # in __init__), so one with fewer always has room for the next
            if current and used + self.lengths[i] > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += self.lengths[i]
        if current and len(current) >= self.min_rows and not self.drop_last:
            batches.append(current)
        return batches

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
