"""One-off accuracy check for RESULTS.md: the first KTO training batch (seed 0, batch 8) scored by the naive head,
by fastkto, and in float64 from the same float32 hidden states. Run from the repository root:
``python examples/results/heads/float64_check.py``."""

import sys

import torch

sys.path.insert(0, "examples")
import train as TR  # noqa: E402

from fastkto import data as D  # noqa: E402
from fastkto.integrations.transformers import get_lm_head, hidden_states  # noqa: E402

torch.set_num_threads(1)
args = TR.parse_args(["--loss", "kto", "--batch", "8", "--eval-pairs", "8", "--seed", "0"])
model, tok = TR.load_model(args)
train, _, _ = TR.build_data(args, tok)
batch = D.KTOCollator(pad_token_id=tok.pad_token_id)(next(TR.batches(train, 8, 0)))
head = get_lm_head(model)
with torch.no_grad():
    h = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"]
    naive = TR.naive_sequence_logps(head, h, labels).double()
    fast = head.sequence_logps(h, labels).double()
    z = h.double() @ head.weight.double().T
    ref = (torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum(-1)
print(f"batch {tuple(labels.shape)}, {int((labels != -100).sum())} scored tokens")
print(f"max |naive - float64|   = {(naive - ref).abs().max().item():.2e}")
print(f"max |fastkto - float64| = {(fast - ref).abs().max().item():.2e}")
