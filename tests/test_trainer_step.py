"""benchmarks.trainer_step end to end on a tiny model: both trainers of each kind run, and the report holds what the
README's numbers are read from."""

import json

import pytest
import torch

pytest.importorskip("trl")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_trainer_step_times_both_heads_and_writes_the_report(tmp_path, one_thread):
    from benchmarks import trainer_step

    out = tmp_path / "report.json"
    argv = ["--models", "tiny", "--trainers", "kto,dpo", "--min-tokens", "16", "--max-tokens", "64", "--rounds",
            "1", "--warmup", "1", "--steps", "1", "--threads", "1", "--device", "cpu", "--out", str(out)]
    assert trainer_step.main(argv) == 0
    report = json.loads(out.read_text())
    for key in ("command", "commit", "when", "machine", "precision", "busy", "load_start", "load_end", "results"):
        assert key in report, key
    assert report["command"].endswith(" ".join(argv)) and report["complete"] is True
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch_threads"] == 1
    assert [(r["model"], r["trainer"]) for r in report["results"]] == [("tiny", "kto"), ("tiny", "dpo")]
    expected = {"kto": {"trl": "KTOTrainer", "fastkto": "FastKTOTrainer"},
                "dpo": {"trl": "DPOTrainer", "fastkto": "FastDPOTrainer"}}
    for result in report["results"]:
        assert result["classes"] == expected[result["trainer"]]
        assert result["batch"] == 2 and result["vocab"] == 640
        shape = result["shape"]
        # KTO: 2 rows (and their 2 KL rows); DPO: 2 pairs, chosen and rejected
        assert shape["sequences"] == (2 if result["trainer"] == "kto" else 4)
        assert 0 < shape["scored_tokens"] < shape["tokens"] <= shape["sequences"] * shape["padded_length"]
        assert [r["order"] for r in result["rounds"]] == [["trl", "fastkto"]]
        for entry in result["rounds"]:
            for side in ("trl", "fastkto"):
                assert len(entry[side]["step_s"]) == 2 and len(entry[side]["kept_s"]) == 1
                assert all(t > 0 for t in entry[side]["step_s"])
                assert len(entry[side]["load_before"]) == 3 and len(entry[side]["load_after"]) == 3
        for side in ("trl", "fastkto"):  # the timed step, not the warm-up
            assert result["median_step_s"][side] == result["rounds"][0][side]["step_s"][1]
        assert result["ratio_fastkto_over_trl"] == pytest.approx(result["median_step_s"]["fastkto"]
                                                                 / result["median_step_s"]["trl"])
        assert result["ratio_spread"][0] <= result["ratio_spread"][1]
        assert result["settings"]["per_device_train_batch_size"] == 2


def test_word_tokenizer_keeps_the_prompt_a_prefix():
    from benchmarks.trainer_step import word_tokenizer

    tok = word_tokenizer(["\n\nHuman: hi there, you?\n\nAssistant: fine, thanks."], vocab_size=16)
    prompt, completion = "\n\nHuman: hi there?\n\nAssistant:", " fine, unseen words."
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    both = tok(prompt + completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert both[: len(ids)] == ids and both[-1] == tok.eos_token_id
    assert len(tok) <= 16 and tok.unk_token_id in both and tok.pad_token_id not in both
