"""fastkto: memory-efficient per-token log-probabilities and the KTO / DPO losses built on them."""

from .data import shift_labels
from .labels import completion_logps
from .logprob import TOKEN_FIELDS, fused_logprobs, sequence_logps, token_stats
from .loss import dpo_loss, kto_kl, kto_loss, suggest_kto_weights
from .modules import DPOLoss, KTOLoss

__version__ = "0.1.0"
__all__ = [
    "fused_logprobs",
    "token_stats",
    "TOKEN_FIELDS",
    "sequence_logps",
    "shift_labels",
    "completion_logps",
    "kto_loss",
    "kto_kl",
    "dpo_loss",
    "suggest_kto_weights",
    "KTOLoss",
    "DPOLoss",
    "__version__",
]
