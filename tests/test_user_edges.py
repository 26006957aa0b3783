"""Edge and bad input a new user hits first: a clear ValueError / TypeError naming the argument, never a silently
truncated token id, a loss with no gradient, a sum over the wrong tokens or a crash deep inside."""

from __future__ import annotations

import pytest
import torch

import fastkto
from fastkto import data as D
from fastkto import packing as P
from fastkto.loss import kto_loss

EXAMPLES = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True},
            {"prompt_ids": [1, 2], "completion_ids": [6, 7, 8], "label": False}]


@pytest.mark.parametrize("key, ids, error, match", [
    ("prompt_ids", [1.7, 2], TypeError, r"example 0: prompt_ids must hold ints.*float"),  # was truncated to 1
    ("completion_ids", [4, 5.5], TypeError, r"completion_ids must hold ints"),
    ("completion_ids", [4, -5], ValueError, r"completion_ids must be token ids >= 0, got -5"),
    ("prompt_ids", "abc", TypeError, r"prompt_ids must be a sequence of ints.*str"),
    ("prompt_ids", [[1, 2]], TypeError, r"prompt_ids must hold ints.*list"),
    ("completion_ids", torch.tensor([[4, 5]]), ValueError, r"completion_ids must be 1-d.*\(1, 2\)"),
    ("completion_ids", torch.tensor([4.0, 5.0]), TypeError, r"completion_ids must hold ints.*float32"),
    ("prompt_ids", [True, 2], TypeError, r"prompt_ids must hold ints.*bool"),
])
def test_collators_refuse_token_ids_that_are_not_ids(key, ids, error, match):
    bad = [dict(EXAMPLES[0], **{key: ids}), EXAMPLES[1]]
    with pytest.raises(error, match=match):
        D.KTOCollator(pad_token_id=0)(bad)


def test_collators_accept_token_ids_as_tensors_and_numpy():
    np = pytest.importorskip("numpy")
    want = D.KTOCollator(pad_token_id=0)(EXAMPLES)
    as_tensors = [dict(e, prompt_ids=torch.tensor(e["prompt_ids"]), completion_ids=np.array(e["completion_ids"]))
                  for e in EXAMPLES]
    got = D.KTOCollator(pad_token_id=0)(as_tensors)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_paired_collator_names_the_side_of_a_bad_token_id():
    with pytest.raises(ValueError, match=r"example 0 \(rejected_ids\): rejected_ids must be token ids >= 0"):
        D.PairedCollator(pad_token_id=0)([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [-1]}])


def test_collator_options_are_checked():
    # a negative pad id reaches the model's embedding as an index (the KL batch pads here)
    with pytest.raises(ValueError, match="pad_token_id must be >= 0"):
        D.KTOCollator(pad_token_id=-100)
    # kl="no" is truthy: it used to build the KL batch
    with pytest.raises(TypeError, match="kl must be a bool"):
        D.KTOCollator(pad_token_id=0, kl="no")


def test_segment_sums_refuse_lengths_that_do_not_cover_the_values():
    values = torch.arange(5.0)
    assert P.segment_sums(values, torch.tensor([2, 3])).tolist() == [1.0, 9.0]
    # lengths summing to 4 of 5 values used to give [1, 5] silently; to 6, a masked_scatter error
    for lengths in ([2, 2], [2, 4]):
        with pytest.raises(ValueError, match=r"lengths must sum to values' length 5"):
            P.segment_sums(values, torch.tensor(lengths))
        with pytest.raises(ValueError, match=r"lengths must sum to flags' length 5"):
            P.segment_counts(values > 0, torch.tensor(lengths))
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        P.segment_sums(values, torch.tensor([7, -2]))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        P.segment_sums(values, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match=r"values must have shape \(T_total,\)"):
        P.segment_sums(values[None], torch.tensor([2, 3]))


def test_cu_seqlens_from_lengths_edges():
    assert P.cu_seqlens_from_lengths([]).tolist() == [0]  # no sequence: used to fail as "float32"
    with pytest.raises(ValueError, match=r"int32 cannot hold"):  # used to wrap around to a negative offset
        P.cu_seqlens_from_lengths([2**31 - 1, 5])
    assert P.cu_seqlens_from_lengths([2**31 - 1, 5], dtype=torch.int64)[-1] == 2**31 + 4
    with pytest.raises(TypeError, match="dtype must be torch.int32 or torch.int64"):
        P.cu_seqlens_from_lengths([2, 3], dtype=torch.float32)


@pytest.mark.parametrize("kl, match", [(-0.5, "kl must be >= 0"), (float("nan"), "kl must be finite"),
                                       (float("inf"), "kl must be finite")])
def test_kto_loss_refuses_a_z0_no_kl_estimate_gives(kl, match):
    # z0 estimates KL(policy || reference) >= 0 (kto_kl and TRL clamp at 0); a negative or non-finite number
    # used to go straight into the loss
    p, r = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match=match):
        kto_loss(p, r, torch.tensor([True, False, True, False]), kl=kl)


def test_kto_refuses_both_class_weights_zero():
    # a loss that is 0 for every batch trains nothing
    p, r, d = torch.randn(4), torch.randn(4), torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="desirable_weight and undesirable_weight cannot both be 0"):
        kto_loss(p, r, d, kl=0.0, desirable_weight=0.0, undesirable_weight=0)
    with pytest.raises(ValueError, match="cannot both be 0"):
        fastkto.KTOLoss(desirable_weight=0, undesirable_weight=0.0)
    assert kto_loss(p, r, d, kl=0.0, desirable_weight=0.0).loss > 0  # one class switched off: allowed
