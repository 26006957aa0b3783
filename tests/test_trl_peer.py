# This file follows TRL's own trainer tests, tests/test_kto_trainer.py and tests/test_dpo_trainer.py of
# huggingface/trl (the 1.16 line), Copyright 2020-2026 The HuggingFace Team, licensed under the Apache License,
# Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0). It is a port, not a copy: the hub models and datasets
# those tests load (trl-internal-testing/tiny-*, trl-internal-testing/zen) are replaced by tiny models built here
# from transformers config classes and by small local datasets in the same formats, every test runs against
# FastKTOTrainer / FastDPOTrainer, and TRL's assertions are kept (train_loss logged, every parameter updated, PEFT
# base weights untouched, the errors TRL raises). Tests marked `parity` also run TRL's own trainer on identical
# copies and compare every logged number.
"""TRL's KTOTrainer / DPOTrainer test suites, ported to run offline against fastkto's trainers.

Left out, with the reason: vision-language models, bitsandbytes quantization, Liger kernels, flash-attention
padding-free training and remote code (each needs a GPU, a hub download or a package CI does not install), the
tool-call and harmony datasets (hub only; gpt-oss itself is covered with a local tiny model), and the collator unit
tests (the Fast trainers use TRL's collators unchanged: test_fast_trainers_keep_trls_collators checks that).
Single-threaded (torch.set_num_threads(1)); the parametrized sweeps over loss types and models are marked slow.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the TRL peer suite needs transformers")
trl = pytest.importorskip("trl", reason="the TRL peer suite needs trl")
datasets = pytest.importorskip("datasets", reason="the TRL peer suite needs datasets")

from datasets import Dataset, DatasetDict, IterableDatasetDict  # noqa: E402
from trl import DPOConfig, KTOConfig  # noqa: E402

from fastkto.integrations.trl import FastDPOTrainer, FastKTOTrainer  # noqa: E402
from test_data import make_char_tokenizer  # noqa: E402
from test_integrations import _compare_logs  # noqa: E402

# A simplified Qwen chat template (the one TRL's chat_template_kwargs test uses takes a `role_capital` argument)
CHAT_TEMPLATE = (
    '{%- for message in messages -%}{{ "<|im_start|>" + (message.role.upper() if role_capital else message.role) '
    '+ "\\n" + message.content + "<|im_end|>\\n" }}{%- endfor -%}'
    '{%- if add_generation_prompt -%}{{ "<|im_start|>" + ("ASSISTANT" if role_capital else "assistant") + "\\n" }}'
    "{%- endif -%}"
)
DEFAULT_TEMPLATE = CHAT_TEMPLATE.replace("role_capital", "false")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ local stand-ins
def kto_args(**kwargs):
    """TRL's tests run on GPU CI with the configs' default bf16; on the CPU that needs use_cpu=True."""
    kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    return KTOConfig(**kwargs)


def dpo_args(**kwargs):
    kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    return DPOConfig(**kwargs)


def _tokenizer(template=DEFAULT_TEMPLATE):
    tok = make_char_tokenizer(template)
    return tok


ARCHS = ("qwen2", "qwen3_moe", "gpt_oss", "cohere2", "olmo3", "llama")


def _config(arch: str, vocab: int, pad: int):
    tf = transformers
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  pad_token_id=pad)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, intermediate_size=64)
    if arch == "llama":
        return tf.LlamaConfig(**common, intermediate_size=64)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                 num_experts_per_tok=2)
    if arch == "gpt_oss":
        return tf.GptOssConfig(**common, head_dim=8, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                               layer_types=["sliding_attention", "full_attention"])
    if arch == "cohere2":  # logit_scale and tied embeddings: the head's transform matters
        return tf.Cohere2Config(**common, intermediate_size=64, logit_scale=0.5,
                                layer_types=["sliding_attention", "full_attention"])
    if arch == "olmo3":
        return tf.Olmo3Config(**common, intermediate_size=64, layer_types=["sliding_attention", "full_attention"])
    raise KeyError(arch)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """{arch: folder} of tiny random models saved with the tokenizer, used like TRL's hub ids (model=path)."""
    root = tmp_path_factory.mktemp("tiny-models")
    tok = _tokenizer()
    dirs = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(arch, len(tok), tok.pad_token_id))
        model.generation_config.pad_token_id = tok.pad_token_id
        folder = root / arch
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        dirs[arch] = str(folder)
    return dirs


@pytest.fixture
def qwen(model_dirs):
    return model_dirs["qwen2"]


FACTS = [(f"What is {a} plus {b}?", f" {a + b}.", f" {a + b + 1}, maybe.") for a, b in
         [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 2), (4, 4), (8, 1), (9, 0), (3, 3), (2, 7), (1, 1), (5, 5),
          (6, 2), (4, 3), (8, 0), (7, 1), (2, 3), (9, 1), (0, 4)]]


def zen(config_name: str, split: str | None = "train"):
    """Small local datasets in the formats of trl-internal-testing/zen (16 train rows, 4 test rows)."""
    def rows(facts):
        out = []
        for i, (q, good, bad) in enumerate(facts):
            if config_name == "standard_preference":
                out.append({"prompt": q, "chosen": good, "rejected": bad})
            elif config_name == "conversational_preference":
                out.append({"prompt": [{"role": "user", "content": q}],
                            "chosen": [{"role": "assistant", "content": good.strip()}],
                            "rejected": [{"role": "assistant", "content": bad.strip()}]})
            elif config_name == "standard_implicit_prompt_preference":
                out.append({"chosen": q + good, "rejected": q + bad})
            elif config_name == "conversational_implicit_prompt_preference":
                user = {"role": "user", "content": q}
                out.append({"chosen": [user, {"role": "assistant", "content": good.strip()}],
                            "rejected": [user, {"role": "assistant", "content": bad.strip()}]})
            elif config_name == "standard_unpaired_preference":
                out.append({"prompt": q, "completion": good if i % 2 else bad, "label": bool(i % 2)})
            elif config_name == "conversational_unpaired_preference":
                out.append({"prompt": [{"role": "user", "content": q}],
                            "completion": [{"role": "assistant", "content": (good if i % 2 else bad).strip()}],
                            "label": bool(i % 2)})
            else:
                raise KeyError(config_name)
        return Dataset.from_list(out)

    splits = DatasetDict({"train": rows(FACTS[:16]), "test": rows(FACTS[16:])})
    return splits if split is None else splits[split]


def _streaming(dataset):
    return dataset.to_iterable_dataset()


def assert_all_changed(previous, model, skip=lambda n: False):
    for n, param in previous.items():
        if skip(n):
            continue
        new_param = model.get_parameter(n)
        assert not torch.equal(param, new_param), f"Parameter {n} has not changed."


def snapshot(trainer):
    return {n: p.clone() for n, p in trainer.model.named_parameters()}


def assert_first_step_matches(theirs, ours):
    """The first logged training step of TRL's trainer and of fastkto's, run with the same seed on the same saved
    model: loss, rewards, log-probs, logits, entropy, KL, aux_loss and the gradient norm must agree.

    Only the first step: these tests keep TRL's learning rates (0.1 to 0.9, AdamW), whose first update is about
    lr * sign(gradient), so gradients that differ in rounding (TRL's backward multiplies in bf16 under its default
    autocast, fastkto's in float32) move near-zero entries differently and later steps drift apart by design.
    Tolerances: bf16 autocast, as in tests/test_integrations.py::test_trl_trainer_parity (measured there: 5e-4
    relative on the gradient norm).
    """
    a = next(m for m in theirs.state.log_history if "loss" in m)
    b = next(m for m in ours.state.log_history if "loss" in m)
    bf16 = bool(ours.args.bf16)
    _compare_logs([a], [b], rtol=2e-3 if bf16 else 1e-5, atol=5e-4 if bf16 else 1e-5)


def run_with_parity(make, trl_cls):
    """Train fastkto's trainer (``make(None)``) and TRL's own (``make(trl_cls)``); compare their first steps."""
    ours = make(None)
    ours.train()
    theirs = make(trl_cls)
    theirs.train()
    assert_first_step_matches(theirs, ours)
    return ours


# ----------------------------------------------------------------------------------------------------------- KTO
class TestKTOTrainer:
    @pytest.mark.parametrize(
        "config_name, loss_type, pre_compute, eval_dataset",
        [
            ("standard_preference", "kto", True, True),
            ("standard_unpaired_preference", "kto", False, True),
            ("conversational_implicit_prompt_preference", "apo_zero_unpaired", True, True),
            ("standard_unpaired_preference", "apo_zero_unpaired", False, True),
        ],
    )
    def test_train(self, config_name, loss_type, pre_compute, eval_dataset, qwen, tmp_path):
        dataset = zen(config_name, split=None)

        def make(cls):
            training_args = kto_args(
                output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, gradient_accumulation_steps=1,
                learning_rate=9e-1, eval_strategy="steps" if eval_dataset else "no", beta=0.1,
                precompute_ref_log_probs=pre_compute, loss_type=loss_type, report_to="none",
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype="float32")
            ref_model = transformers.AutoModelForCausalLM.from_pretrained(qwen)
            return (cls or FastKTOTrainer)(
                model=model, ref_model=ref_model, args=training_args, processing_class=_tokenizer(),
                train_dataset=dataset["train"], eval_dataset=dataset["test"] if eval_dataset else None,
            )

        trainer = make(None)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model, skip=lambda n: previous[n].sum() == 0)  # ignore 0 biases

    @pytest.mark.parity
    @pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
    def test_train_parity_with_trl(self, loss_type, qwen, tmp_path):
        dataset = zen("standard_unpaired_preference", split=None)

        def make(cls):
            args = kto_args(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.1,
                            eval_strategy="steps", eval_steps=2, loss_type=loss_type, report_to="none", seed=0,
                            logging_steps=1)
            return (cls or FastKTOTrainer)(model=qwen, args=args, train_dataset=dataset["train"],
                                           eval_dataset=dataset["test"])

        run_with_parity(make, trl.KTOTrainer)

    @pytest.mark.parametrize("precompute_ref_log_probs", [False, True])
    def test_evaluate_with_raw_dataset(self, precompute_ref_log_probs, qwen, tmp_path):
        dataset = zen("standard_unpaired_preference")
        training_args = kto_args(output_dir=str(tmp_path), precompute_ref_log_probs=precompute_ref_log_probs,
                                  report_to="none")
        trainer = FastKTOTrainer(model=qwen, args=training_args, train_dataset=dataset)
        metrics = trainer.evaluate(eval_dataset=dataset)
        assert metrics["eval_loss"] is not None

    @pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe"])
    def test_train_moe(self, arch, model_dirs, tmp_path):
        """TRL's test_train_gpt_oss, on a local tiny gpt-oss (and Qwen3-MoE): the aux loss is on by default."""
        dataset = zen("standard_unpaired_preference")
        training_args = kto_args(output_dir=str(tmp_path), learning_rate=0.1, report_to="none")
        trainer = FastKTOTrainer(model=model_dirs[arch], args=training_args, train_dataset=dataset)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)
        # MoE models log the load-balancing auxiliary loss (on by default)
        assert trainer.aux_loss_enabled
        assert [m["aux_loss"] for m in trainer.state.log_history if "aux_loss" in m]

    def test_train_with_ref_model_is_model_raises(self, qwen, tmp_path):
        training_args = kto_args(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                  report_to="none")
        model = transformers.AutoModelForCausalLM.from_pretrained(qwen)
        with pytest.raises(ValueError):
            FastKTOTrainer(model=model, ref_model=model, args=training_args, processing_class=_tokenizer(),
                           train_dataset=zen("standard_unpaired_preference"))

    def test_tokenize_and_process_tokens(self, qwen, tmp_path):
        tokenizer = _tokenizer()
        training_args = kto_args(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                  learning_rate=9e-1, eval_strategy="steps", beta=0.1, report_to="none")
        dataset = zen("standard_unpaired_preference", split=None)
        train_dataset = dataset["train"]
        trainer = FastKTOTrainer(model=qwen, ref_model=None, args=training_args, processing_class=tokenizer,
                                 train_dataset=train_dataset, eval_dataset=dataset["test"])
        # the dataset stores raw token ids; prompt_ids start with the tokenized prompt text
        prompt_ids = tokenizer(train_dataset["prompt"][0])["input_ids"]
        assert trainer.train_dataset[0]["prompt_ids"][: len(prompt_ids)] == prompt_ids
        assert len(trainer.train_dataset[0]["completion_ids"]) > 0
        # the collator output: input_ids end with EOS, the prompt is masked out of completion_mask
        batch = trainer.data_collator([trainer.train_dataset[0]])
        assert batch["input_ids"][0, -1].item() == tokenizer.eos_token_id
        completion_mask = batch["completion_mask"][0].tolist()
        assert 0 in completion_mask and 1 in completion_mask
        first_completion = next(i for i, m in enumerate(completion_mask) if m == 1)
        assert first_completion > 0
        assert all(m == 0 for m in completion_mask[:first_completion])

    @pytest.mark.parametrize("lora", [False, True])
    def test_train_without_providing_ref_model(self, lora, qwen, tmp_path):
        peft_config = None
        if lora:
            peft = pytest.importorskip("peft")
            peft_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
        training_args = kto_args(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                  gradient_accumulation_steps=4, learning_rate=9e-1, eval_strategy="steps", beta=0.1,
                                  report_to="none")
        dataset = zen("standard_unpaired_preference", split=None)
        model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype="float32")
        trainer = FastKTOTrainer(model=model, ref_model=None, args=training_args, processing_class=_tokenizer(),
                                 train_dataset=dataset["train"], eval_dataset=dataset["test"],
                                 peft_config=peft_config)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model,
                           skip=lambda n: previous[n].sum() == 0 or (lora and "lora" not in n))

    def test_compute_metrics(self, qwen, tmp_path):
        dataset = zen("standard_unpaired_preference", split=None)

        def dummy_compute_metrics(*args, **kwargs):
            return {"test": 0.0}

        training_args = kto_args(output_dir=str(tmp_path), per_device_train_batch_size=2, do_eval=True,
                                  eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2, report_to="none")
        model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype="float32")
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(qwen)
        trainer = FastKTOTrainer(model=model, ref_model=ref_model, args=training_args, processing_class=_tokenizer(),
                                 train_dataset=dataset["train"], eval_dataset=dataset["test"],
                                 compute_metrics=dummy_compute_metrics)
        trainer.train()
        assert trainer.state.log_history[-2]["eval_test"] == 0.0

    def test_train_with_explicit_ref_model(self, qwen, tmp_path):
        dataset = zen("standard_unpaired_preference")
        training_args = kto_args(output_dir=str(tmp_path), learning_rate=0.1, report_to="none")
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype="float32")
        trainer = FastKTOTrainer(model=qwen, ref_model=ref_model, args=training_args, train_dataset=dataset)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)
        for n, param in previous.items():
            torch.testing.assert_close(param, trainer.ref_model.get_parameter(n),
                                       msg=f"Reference model parameter {n} has changed.")

    def test_train_with_sync_ref_model(self, qwen, tmp_path):
        dataset = zen("standard_unpaired_preference")
        training_args = kto_args(output_dir=str(tmp_path), learning_rate=0.1, sync_ref_model=True,
                                  ref_model_sync_steps=1, per_device_train_batch_size=4, report_to="none")
        trainer = FastKTOTrainer(model=qwen, args=training_args, train_dataset=dataset)
        previous = snapshot(trainer)
        assert trainer.ref_model is not None
        previous_ref = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)
        for n in previous:
            assert not torch.equal(previous_ref[n], trainer.ref_model.get_parameter(n)), f"Ref {n} has not changed."

    def test_train_model_dtype(self, qwen, tmp_path):
        dataset = zen("standard_unpaired_preference")
        training_args = kto_args(output_dir=str(tmp_path), model_init_kwargs={"dtype": torch.float16},
                                  learning_rate=0.1, report_to="none")
        trainer = FastKTOTrainer(model=qwen, args=training_args, train_dataset=dataset)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        for n, param in previous.items():
            if "layernorm" in n:  # TRL skips these too (they do not move in its CI either)
                continue
            new_param = trainer.model.get_parameter(n)
            assert new_param.dtype == torch.float16
            assert not torch.equal(param, new_param), f"Parameter {n} has not changed."

    @pytest.mark.parametrize("how", ["peft_model", "peft_config_and_gradient_checkpointing"])
    def test_train_peft(self, how, qwen, tmp_path):
        peft = pytest.importorskip("peft")
        model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype="float32")
        base_param_names = [f"base_model.model.{n}" for n, _ in model.named_parameters()]
        dataset = zen("standard_unpaired_preference")
        if how == "peft_model":
            model = peft.get_peft_model(model, peft.LoraConfig())
            training_args = kto_args(output_dir=str(tmp_path), learning_rate=1.0, report_to="none")
            trainer = FastKTOTrainer(model=model, args=training_args, train_dataset=dataset)
        else:
            training_args = kto_args(output_dir=str(tmp_path), learning_rate=0.1, gradient_checkpointing=True,
                                      report_to="none")
            trainer = FastKTOTrainer(model=qwen, args=training_args, train_dataset=dataset,
                                     peft_config=peft.LoraConfig())
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        for n, param in previous.items():
            new_param = trainer.model.get_parameter(n)
            if n in base_param_names:
                torch.testing.assert_close(param, new_param, msg=f"Parameter {n} has changed.")
            elif "base_layer" not in n and "ref" not in n:
                assert not torch.equal(param, new_param), f"Parameter {n} has not changed."

    @pytest.mark.parametrize("iterable_as", ["train", "eval", "eval_dict", "eval_iterable_dataset_dict"])
    def test_precompute_ref_log_probs_raises_for_iterable_dataset(self, iterable_as, qwen, tmp_path):
        map_dataset = zen("standard_unpaired_preference")
        iterable_dataset = _streaming(map_dataset)
        train_dataset, eval_dataset = map_dataset, None
        if iterable_as == "train":
            train_dataset = iterable_dataset
        elif iterable_as == "eval":
            eval_dataset = iterable_dataset
        elif iterable_as == "eval_dict":
            eval_dataset = {"eval": iterable_dataset}
        else:
            eval_dataset = IterableDatasetDict({"eval": iterable_dataset})
        training_args = kto_args(output_dir=str(tmp_path), loss_type="apo_zero_unpaired", max_steps=1,
                                  report_to="none", precompute_ref_log_probs=True)
        with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
            FastKTOTrainer(model=qwen, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)

    def test_train_with_iterable_dataset(self, qwen, tmp_path):
        dataset = _streaming(zen("standard_unpaired_preference"))
        training_args = kto_args(output_dir=str(tmp_path), learning_rate=0.1, loss_type="apo_zero_unpaired",
                                  max_steps=3, report_to="none")
        trainer = FastKTOTrainer(model=qwen, args=training_args, train_dataset=dataset)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)

    def test_train_with_chat_template_kwargs(self, qwen, tmp_path):
        dataset = zen("conversational_preference")
        training_args = kto_args(output_dir=str(tmp_path), learning_rate=0.1, report_to="none")
        tokenizer = _tokenizer(CHAT_TEMPLATE)
        dataset = dataset.add_column("chat_template_kwargs", [{"role_capital": bool(i % 2)} for i in range(16)])
        trainer = FastKTOTrainer(model=qwen, args=training_args, train_dataset=dataset, processing_class=tokenizer)
        assert trainer.processing_class.chat_template == tokenizer.chat_template
        # one token per character: join the tokens (decode would put spaces between them)
        decoded = ["".join(tokenizer.convert_ids_to_tokens(trainer.train_dataset[i]["prompt_ids"]))
                   for i in range(len(trainer.train_dataset))]
        assert any("<|im_start|>USER" in p for p in decoded) and any("<|im_start|>user" in p for p in decoded)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)

    def test_train_with_eval_and_multiple_eval_datasets(self, qwen, tmp_path):
        dataset = zen("standard_unpaired_preference", split=None)
        training_args = kto_args(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=1, max_steps=1,
                                  report_to="none")
        trainer = FastKTOTrainer(model=qwen, args=training_args, train_dataset=dataset["train"],
                                 eval_dataset={"data1": dataset["test"], "data2": dataset["test"]})
        trainer.train()
        assert trainer.state.log_history[-3]["eval_data1_loss"] is not None
        assert trainer.state.log_history[-2]["eval_data2_loss"] is not None
        assert trainer.state.log_history[-3]["eval_data1_loss"] == trainer.state.log_history[-2]["eval_data2_loss"]

    @pytest.mark.parametrize("streaming", [False, True])
    def test_init_with_eval_dataset_dict(self, streaming, qwen, tmp_path):
        train_dataset = zen("standard_unpaired_preference")
        eval_split = zen("standard_unpaired_preference", "test")
        if streaming:
            eval_split = _streaming(eval_split)
        eval_dataset = (IterableDatasetDict if streaming else DatasetDict)({"data1": eval_split, "data2": eval_split})
        training_args = kto_args(output_dir=str(tmp_path), loss_type="apo_zero_unpaired", report_to="none")
        trainer = FastKTOTrainer(model=qwen, args=training_args, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset)
        assert set(trainer.eval_dataset.keys()) == {"data1", "data2"}
        assert "prompt_ids" in next(iter(trainer.eval_dataset["data1"]))
        assert "prompt_ids" in next(iter(trainer.eval_dataset["data2"]))

    def test_tag_added(self, qwen, tmp_path):
        trainer = FastKTOTrainer(model=qwen, args=kto_args(output_dir=str(tmp_path), report_to="none"),
                                 train_dataset=zen("standard_unpaired_preference"))
        for tag in ["kto", "trl"]:
            assert tag in trainer.model.model_tags


# ----------------------------------------------------------------------------------------------------------- DPO
DPO_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class TestDPOTrainer:
    @pytest.mark.parity
    @pytest.mark.parametrize("arch", [
        "qwen2", "cohere2", "olmo3",
        pytest.param("qwen3_moe", marks=pytest.mark.slow), pytest.param("gpt_oss", marks=pytest.mark.slow),
    ])
    def test_train(self, arch, model_dirs, tmp_path):
        dataset = zen("standard_preference")

        def make(cls):
            args = dpo_args(output_dir=str(tmp_path), learning_rate=0.1, report_to="none", seed=0, logging_steps=1)
            return (cls or FastDPOTrainer)(model=model_dirs[arch], args=args, train_dataset=dataset)

        trainer = make(None)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        if trainer.aux_loss_enabled:  # MoE models log the load-balancing auxiliary loss (on by default)
            assert all(m["aux_loss"] is not None for m in trainer.state.log_history if "loss" in m)
        assert arch not in ("qwen3_moe", "gpt_oss") or trainer.aux_loss_enabled
        assert_all_changed(previous, trainer.model)
        theirs = make(trl.DPOTrainer)
        theirs.train()
        assert_first_step_matches(theirs, trainer)

    @pytest.mark.parametrize("precompute_ref_log_probs", [False, True])
    @pytest.mark.parametrize("eval_dataset_type", ["dataset", "iterable_dataset", "dataset_dict",
                                                   "iterable_dataset_dict", "dict_of_dataset",
                                                   "dict_of_iterable_dataset"])
    def test_evaluate_with_eval_dataset(self, eval_dataset_type, precompute_ref_log_probs, qwen, tmp_path):
        train_dataset = zen("standard_preference")
        streaming = "iterable" in eval_dataset_type
        eval_split = zen("standard_preference", "test")
        if streaming:
            eval_split = _streaming(eval_split)
        if eval_dataset_type in ("dataset", "iterable_dataset"):
            eval_dataset = eval_split
        elif eval_dataset_type in ("dataset_dict", "iterable_dataset_dict"):
            eval_dataset = (IterableDatasetDict if streaming else DatasetDict)({"data1": eval_split,
                                                                               "data2": eval_split})
        else:
            eval_dataset = {"data1": eval_split, "data2": eval_split}
        training_args = dpo_args(output_dir=str(tmp_path), precompute_ref_log_probs=precompute_ref_log_probs,
                                  report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=training_args, train_dataset=train_dataset)
        if streaming and precompute_ref_log_probs:
            with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
                trainer.evaluate(eval_dataset=eval_dataset)
            return
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        if eval_dataset_type in ("dataset", "iterable_dataset"):
            assert metrics["eval_loss"] is not None
        else:
            assert metrics["eval_data1_loss"] is not None
            assert metrics["eval_data2_loss"] is not None

    def test_evaluate_precompute_ref_log_probs_after_training_raises(self, qwen, tmp_path):
        training_args = dpo_args(output_dir=str(tmp_path), max_steps=1, precompute_ref_log_probs=True,
                                  report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=training_args, train_dataset=zen("standard_preference"))
        eval_dataset = zen("standard_preference", "test")
        assert trainer.evaluate(eval_dataset=eval_dataset)["eval_loss"] is not None
        trainer.train()
        with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to"):
            trainer.evaluate(eval_dataset=eval_dataset)

    @pytest.mark.parametrize("eval_dataset_type", ["dataset", "dataset_dict", "dict_of_dataset"])
    def test_evaluate_precompute_ref_log_probs_at_init_after_training(self, eval_dataset_type, qwen, tmp_path):
        eval_split = zen("standard_preference", "test")
        if eval_dataset_type == "dataset":
            eval_dataset = eval_split
        elif eval_dataset_type == "dataset_dict":
            eval_dataset = DatasetDict({"data1": eval_split, "data2": eval_split})
        else:
            eval_dataset = {"data1": eval_split, "data2": eval_split}
        training_args = dpo_args(output_dir=str(tmp_path), max_steps=1, precompute_ref_log_probs=True,
                                  report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=training_args, train_dataset=zen("standard_preference"),
                                 eval_dataset=eval_dataset)
        trainer.train()
        metrics = trainer.evaluate()
        if eval_dataset_type == "dataset":
            assert metrics["eval_loss"] is not None
        else:
            assert metrics["eval_data1_loss"] is not None and metrics["eval_data2_loss"] is not None

    @pytest.mark.parametrize("config_name", ["standard_preference", "conversational_preference",
                                             "standard_implicit_prompt_preference",
                                             "conversational_implicit_prompt_preference"])
    def test_train_dataset_format(self, config_name, qwen, tmp_path):
        training_args = dpo_args(output_dir=str(tmp_path), learning_rate=0.1, report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=training_args, train_dataset=zen(config_name))
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)

    @pytest.mark.slow
    @pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES + [["sigmoid", "bco_pair", "sft"]])
    def test_train_loss_types(self, loss_type, qwen, tmp_path):
        """TRL's test_train_loss_types and test_train_multi_loss_types (MPO's combination), with parity."""
        dataset = zen("standard_preference", split=None)

        def make(cls):
            training_args = dpo_args(output_dir=str(tmp_path), loss_type=loss_type,
                                      label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0, learning_rate=0.1,
                                      report_to="none", eval_strategy="steps", eval_steps=2, seed=0,
                                      per_device_train_batch_size=4, max_steps=2, logging_steps=1)
            return (cls or FastDPOTrainer)(model=qwen, args=training_args, train_dataset=dataset["train"],
                                           eval_dataset=dataset["test"])

        trainer = make(None)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)
        theirs = make(trl.DPOTrainer)
        theirs.train()
        assert_first_step_matches(theirs, trainer)

    @pytest.mark.parametrize("option", [{"use_weighting": True}, {"ld_alpha": 0.5},
                                        {"f_divergence_type": "reverse_kl"}, {"f_divergence_type": "forward_kl"},
                                        {"f_divergence_type": "js_divergence"},
                                        {"f_divergence_type": "alpha_divergence"}])
    def test_train_with_option(self, option, qwen, tmp_path):
        """TRL's test_train_with_wpo, test_train_with_ld and test_train_with_f_divergence."""
        training_args = dpo_args(output_dir=str(tmp_path), learning_rate=0.1, report_to="none", **option)
        trainer = FastDPOTrainer(model=qwen, args=training_args, train_dataset=zen("standard_preference"))
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)

    def test_train_with_explicit_and_synced_ref_model(self, qwen, tmp_path):
        dataset = zen("standard_preference")
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype="float32")
        trainer = FastDPOTrainer(model=qwen, ref_model=ref_model, train_dataset=dataset,
                                 args=dpo_args(output_dir=str(tmp_path), learning_rate=0.1, report_to="none"))
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)
        for n, param in previous.items():
            torch.testing.assert_close(param, trainer.ref_model.get_parameter(n))

        args = dpo_args(output_dir=str(tmp_path), learning_rate=0.1, sync_ref_model=True, ref_model_sync_steps=1,
                         report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=args, train_dataset=dataset)
        previous_ref = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
        trainer.train()
        for n in previous_ref:
            assert not torch.equal(previous_ref[n], trainer.ref_model.get_parameter(n)), f"Ref {n} has not changed."

    def test_train_model_dtype(self, qwen, tmp_path):
        training_args = dpo_args(output_dir=str(tmp_path), model_init_kwargs={"dtype": torch.float16},
                                  learning_rate=0.1, report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=training_args, train_dataset=zen("standard_preference"))
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        for n, param in previous.items():
            if "layernorm" in n:
                continue
            new_param = trainer.model.get_parameter(n)
            assert new_param.dtype == torch.float16
            assert not torch.equal(param, new_param), f"Parameter {n} has not changed."

    @pytest.mark.parametrize("how", ["dense_peft_config", "peft_model", "moe_peft_config", "moe_peft_model"])
    def test_train_peft(self, how, model_dirs, tmp_path):
        peft = pytest.importorskip("peft")
        moe = how.startswith("moe")
        path = model_dirs["gpt_oss" if moe else "qwen2"]
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        base_param_names = [f"base_model.model.{n}" for n, _ in model.named_parameters()]
        lora = (peft.LoraConfig(target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]) if moe
                else peft.LoraConfig())
        training_args = dpo_args(output_dir=str(tmp_path), learning_rate=0.1 if moe else 1.0, report_to="none")
        if how.endswith("peft_model"):
            trainer = FastDPOTrainer(model=peft.get_peft_model(model, lora), args=training_args,
                                     train_dataset=zen("standard_preference"))
            # upstream asserts "ref" not in peft_config here (PEFT once allowed one adapter per model with
            # target_parameters); TRL 1.16 with PEFT 0.21 adds its "ref" adapter, its own trainer included
        else:
            trainer = FastDPOTrainer(model=path, args=training_args, train_dataset=zen("standard_preference"),
                                     peft_config=lora)
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        for n, param in previous.items():
            new_param = trainer.model.get_parameter(n)
            if n in base_param_names:
                torch.testing.assert_close(param, new_param, msg=f"Parameter {n} has changed.")
            elif "base_layer" not in n and "ref" not in n:
                assert not torch.equal(param, new_param), f"Parameter {n} has not changed."

    @pytest.mark.parametrize("iterable_as", ["train", "eval", "eval_dict", "eval_iterable_dataset_dict"])
    def test_precompute_ref_log_probs_raises_for_iterable_dataset(self, iterable_as, qwen, tmp_path):
        map_dataset = zen("standard_preference")
        iterable_dataset = _streaming(map_dataset)
        train_dataset, eval_dataset = map_dataset, None
        if iterable_as == "train":
            train_dataset = iterable_dataset
        elif iterable_as == "eval":
            eval_dataset = iterable_dataset
        elif iterable_as == "eval_dict":
            eval_dataset = {"eval": iterable_dataset}
        else:
            eval_dataset = IterableDatasetDict({"eval": iterable_dataset})
        training_args = dpo_args(output_dir=str(tmp_path), max_steps=1, report_to="none",
                                  precompute_ref_log_probs=True)
        with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
            FastDPOTrainer(model=qwen, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)

    def test_train_with_iterable_dataset(self, qwen, tmp_path):
        training_args = dpo_args(output_dir=str(tmp_path), learning_rate=0.1, max_steps=3, report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=training_args,
                                 train_dataset=_streaming(zen("standard_preference")))
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)

    def test_train_with_chat_template_kwargs(self, qwen, tmp_path):
        dataset = zen("conversational_preference")
        tokenizer = _tokenizer(CHAT_TEMPLATE)
        dataset = dataset.add_column("chat_template_kwargs", [{"role_capital": bool(i % 2)} for i in range(16)])
        trainer = FastDPOTrainer(model=qwen, args=dpo_args(output_dir=str(tmp_path), learning_rate=0.1,
                                                            report_to="none"),
                                 train_dataset=dataset, processing_class=tokenizer)
        assert trainer.processing_class.chat_template == tokenizer.chat_template
        for i in range(2):
            role = "USER" if i else "user"
            header_ids = tokenizer(f"<|im_start|>{role}\n")["input_ids"]
            assert trainer.train_dataset[i]["prompt_ids"][: len(header_ids)] == header_ids
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)

    def test_fully_truncated_completion_examples_dropped(self, qwen, tmp_path):
        dataset = Dataset.from_dict({
            "prompt": ["Hi", "This is a very long prompt that fills up the whole max_length budget on its own"],
            "chosen": [" there", " yes"], "rejected": [" bye", " no"],
        })
        training_args = dpo_args(output_dir=str(tmp_path), max_length=6, truncation_mode="keep_start",
                                  report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=training_args, train_dataset=dataset,
                                 processing_class=_tokenizer())
        assert len(trainer.train_dataset) == 1
        assert trainer.train_dataset[0]["prompt_ids"] == trainer.processing_class("Hi")["input_ids"]

    def test_train_with_eval_and_multiple_eval_datasets(self, qwen, tmp_path):
        dataset = zen("standard_preference", split=None)
        args = dpo_args(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=1, max_steps=1, report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=args, train_dataset=dataset["train"],
                                 eval_dataset={"data1": dataset["test"], "data2": dataset["test"]})
        trainer.train()
        assert trainer.state.log_history[-3]["eval_data1_loss"] is not None
        assert trainer.state.log_history[-2]["eval_data2_loss"] is not None

    @pytest.mark.parametrize("train_dataset_type", ["dataset", "iterable_dataset", "none", "unsupported_dataset_dict"])
    def test_init_with_train_dataset(self, train_dataset_type, qwen, tmp_path):
        streaming = "iterable" in train_dataset_type
        train_dataset = None if train_dataset_type == "none" else zen("standard_preference")
        if streaming:
            train_dataset = _streaming(train_dataset)
        if train_dataset_type == "unsupported_dataset_dict":
            train_dataset = DatasetDict({"train": train_dataset})
        training_args = dpo_args(output_dir=str(tmp_path), max_steps=3 if streaming else -1, report_to="none")
        if train_dataset_type == "none":
            with pytest.raises(ValueError, match="`train_dataset` is required"):
                FastDPOTrainer(model=qwen, args=training_args, train_dataset=train_dataset)
        elif train_dataset_type == "unsupported_dataset_dict":
            with pytest.raises(TypeError, match="`train_dataset` must be a `Dataset` or `IterableDataset`"):
                FastDPOTrainer(model=qwen, args=training_args, train_dataset=train_dataset)
        else:
            trainer = FastDPOTrainer(model=qwen, args=training_args, train_dataset=train_dataset)
            assert "prompt_ids" in next(iter(trainer.train_dataset))

    @pytest.mark.parametrize("eval_dataset_type", ["dataset", "iterable_dataset", "dataset_dict",
                                                   "iterable_dataset_dict", "dict_of_dataset",
                                                   "dict_of_iterable_dataset", "none"])
    def test_init_with_eval_dataset(self, eval_dataset_type, qwen, tmp_path):
        eval_dataset = None
        if eval_dataset_type != "none":
            streaming = "iterable" in eval_dataset_type
            eval_split = zen("standard_preference", "test")
            if streaming:
                eval_split = _streaming(eval_split)
            if eval_dataset_type in ("dataset", "iterable_dataset"):
                eval_dataset = eval_split
            elif eval_dataset_type in ("dataset_dict", "iterable_dataset_dict"):
                eval_dataset = (IterableDatasetDict if streaming else DatasetDict)({"data1": eval_split,
                                                                                   "data2": eval_split})
            else:
                eval_dataset = {"data1": eval_split, "data2": eval_split}
        trainer = FastDPOTrainer(model=qwen, args=dpo_args(output_dir=str(tmp_path), report_to="none"),
                                 train_dataset=zen("standard_preference"), eval_dataset=eval_dataset)
        if eval_dataset_type == "none":
            assert trainer.eval_dataset is None
        elif isinstance(trainer.eval_dataset, dict):
            assert set(trainer.eval_dataset.keys()) == {"data1", "data2"}
            assert "prompt_ids" in next(iter(trainer.eval_dataset["data1"]))
            assert "prompt_ids" in next(iter(trainer.eval_dataset["data2"]))
        else:
            assert "prompt_ids" in next(iter(trainer.eval_dataset))

    def test_train_with_compute_metrics(self, qwen, tmp_path):
        dataset = zen("standard_preference", split=None)

        def dummy_compute_metrics(eval_pred):
            return {"my_metric": 0.123}

        args = dpo_args(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=1, max_steps=1, report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=args, train_dataset=dataset["train"], eval_dataset=dataset["test"],
                                 compute_metrics=dummy_compute_metrics)
        trainer.train()
        assert trainer.state.log_history[-2]["eval_my_metric"] == 0.123

    def test_train_with_gradient_checkpointing(self, qwen, tmp_path):
        args = dpo_args(output_dir=str(tmp_path), learning_rate=0.1, gradient_checkpointing=True, report_to="none")
        trainer = FastDPOTrainer(model=qwen, args=args, train_dataset=zen("standard_preference"))
        previous = snapshot(trainer)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(previous, trainer.model)

    @pytest.mark.parametrize("peft_config", [False, True])
    def test_tag_added(self, peft_config, qwen, tmp_path):
        extra = {}
        if peft_config:
            extra["peft_config"] = pytest.importorskip("peft").LoraConfig()
        trainer = FastDPOTrainer(model=qwen, args=dpo_args(output_dir=str(tmp_path), report_to="none"),
                                 train_dataset=zen("standard_preference"), **extra)
        for tag in ["dpo", "trl"]:
            assert tag in trainer.model.model_tags


def test_fast_trainers_keep_trls_collators(qwen, tmp_path):
    """The collator tests of TRL's suites need no port: the Fast trainers hand batches to TRL's own collators."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    kto = FastKTOTrainer(model=qwen, args=kto_args(output_dir=str(tmp_path), report_to="none"),
                         train_dataset=zen("standard_unpaired_preference"))
    dpo = FastDPOTrainer(model=qwen, args=dpo_args(output_dir=str(tmp_path), report_to="none"),
                         train_dataset=zen("standard_preference"))
    assert type(kto.data_collator) is DataCollatorForUnpairedPreference
    assert type(dpo.data_collator) is DataCollatorForPreference
