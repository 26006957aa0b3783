"""fastkto.integrations: transformers models' hidden states and heads, PEFT, checkpointing, ZeRO-3 gathering,
the real SmolLM2 GGUF, and TRL's trainers with fastkto as their head (parity with TRL's own head).

Tolerances. Tiny models run in float32; the reference is ``log_softmax`` of the model's own float32 logits taken
in float64. Both sides round the logits once in float32 (|z| <= ~40 here, so about 5e-6 absolute), hence
``atol=2e-5`` on log-probabilities; gradients agree to ~2e-6 of each parameter's largest gradient entry, hence
``rtol=2e-5`` of that scale.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers")

from fastkto import data as D  # noqa: E402
from fastkto import reference  # noqa: E402
from fastkto.integrations import transformers as T  # noqa: E402
from test_data import CHAT_TEMPLATE, make_char_tokenizer, smollm2_gguf  # noqa: E402

LOGP_ATOL = 2e-5
GRAD_RTOL = 2e-5
V = 97
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def tiny(arch: str) -> torch.nn.Module:
    """A tiny random causal LM of ``arch`` built offline from its config class, with O(10) logits so that soft-caps
    and scales matter, in eval mode."""
    tf = transformers
    builders = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
        "llama_tied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, tie_word_embeddings=True)),
        "gemma2_softcap": lambda: tf.Gemma2ForCausalLM(
            tf.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=3.0)
        ),
        "cohere_scale": lambda: tf.CohereForCausalLM(tf.CohereConfig(**COMMON, logit_scale=0.5)),
        "granite_scaling": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**COMMON, logits_scaling=4.0)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4)),
        "phi_bias": lambda: tf.PhiForCausalLM(tf.PhiConfig(**COMMON)),
    }
    model = builders[arch]().eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0)
        if head.bias is not None:
            head.bias.normal_(0.0, 1.0)  # Phi initializes it to 0, which would hide a dropped bias
    return model


def padded_batch(n=3, t=12):
    ids = torch.randint(0, V, (n, t))
    mask = torch.ones_like(ids)
    mask[1, t - 4 :] = 0
    mask[2, 5:] = 0
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return ids, mask, labels


def model_logprobs(model, ids, mask, labels):
    """Reference: log_softmax of the model's own logits in float64, at the next-token labels, 0 where masked."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return reference.label_logprobs(logits.double(), labels)


def assert_grads_close(got, want, rtol=GRAD_RTOL):
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.abs().max() == 0
            continue
        scale = w.abs().max().clamp(min=1e-12)
        assert (g - w).abs().max() <= rtol * scale


# ---------------------------------------------------------------------------------------------- architectures
ARCHS = ["llama", "llama_tied", "gemma2_softcap", "cohere_scale", "granite_scaling", "gpt2", "phi_bias"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_equal_the_models_own_logits(arch, seed):
    model = tiny(arch)
    ids, mask, labels = padded_batch()
    want = model_logprobs(model, ids, mask, labels)
    hidden = T.hidden_states(model, ids, mask)[:, :-1]
    head = T.get_lm_head(model)
    got = head.logprobs(hidden, labels)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=LOGP_ATOL)
    torch.testing.assert_close(head.sequence_logps(hidden, labels).double(), want.sum(-1), rtol=0, atol=20 * LOGP_ATOL)
    if arch in ("gemma2_softcap", "cohere_scale", "granite_scaling"):
        # the transform is not a no-op here: the bare projection gives other log-probs
        plain = T.LMHead(head.weight).logprobs(hidden, labels)
        assert (plain.double() - want).abs().max() > 1e-2
    if arch == "phi_bias":
        no_bias = T.LMHead(head.weight).logprobs(hidden, labels)
        assert head.bias is not None and (no_bias.double() - want).abs().max() > 1e-2
    if arch in ("llama_tied", "gpt2", "cohere_scale"):
        assert head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ["llama_tied", "gemma2_softcap", "granite_scaling", "phi_bias"])
def test_gradients_equal_the_models_own(arch, seed):
    model = tiny(arch)
    ids, mask, labels = padded_batch()
    upstream = torch.randn(labels.shape)
    params = [p for p in model.parameters()]
    want = torch.autograd.grad((model_logprobs(model, ids, mask, labels).float() * upstream).sum(), params,
                               allow_unused=True)
    got_lp = T.get_lm_head(model).logprobs(T.hidden_states(model, ids, mask)[:, :-1], labels)
    got = torch.autograd.grad((got_lp * upstream).sum(), params, allow_unused=True)
    assert_grads_close(got, want)


def test_logit_transform_mapping():
    cfg = SimpleNamespace
    assert T.logit_transform(cfg()) == (None, 1.0)
    assert T.logit_transform(cfg(logit_scale=0.25)) == (None, 4.0)
    assert T.logit_transform(cfg(logits_scaling=8.0, model_type="granite")) == (None, 8.0)
    assert T.logit_transform(cfg(logits_scaling=8.0, model_type="hyperclovax")) == (None, 0.125)
    assert T.logit_transform(cfg(lm_head_multiplier=2.0), temperature=0.5) == (None, 0.25)
    # a scale s before a soft-cap c equals soft-cap c / s, then temperature 1 / s
    softcap, temp = T.logit_transform(cfg(logit_scale=2.5, final_logit_softcapping=30.0))
    a = torch.linspace(-80, 80, 101, dtype=torch.float64)
    torch.testing.assert_close(reference.transform_logits(a, softcap=softcap, temperature=temp),
                               30.0 * torch.tanh(2.5 * a / 30.0))
    with pytest.raises(ValueError, match="logit scale"):
        T.logit_transform(cfg(logit_scale=-1.0))
    with pytest.raises(ValueError, match="temperature"):
        T.logit_transform(cfg(), temperature=0)


def test_no_lm_head_is_a_clear_error():
    base = transformers.LlamaModel(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match="no LM head to find"):
        T.get_lm_head(base)
    with pytest.raises(ValueError, match="no backbone"):
        T.get_backbone(base)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        T.get_lm_head("gpt2")


def test_collator_batch_through_backbone_and_head(seed):
    """End to end: the collator's shifted labels with the backbone's hidden states give each completion's summed
    log-probability under the model, padding and prompts excluded; the KL batch pairs prompt i with completion i+1."""
    model = tiny("llama")
    g = torch.Generator().manual_seed(seed)
    lengths = zip(torch.randint(1, 8, (3,), generator=g).tolist(), torch.randint(1, 6, (3,), generator=g).tolist())
    examples = [{"prompt_ids": torch.randint(3, V, (n,), generator=g).tolist(),
                 "completion_ids": torch.randint(3, V, (m,), generator=g).tolist(), "label": bool(i % 2)}
                for i, (n, m) in enumerate(lengths)]
    batch = D.KTOCollator(pad_token_id=0)(examples)
    head = T.get_lm_head(model)
    for prefix, completions in (("", [e["completion_ids"] for e in examples]),
                                ("kl_", [examples[(i + 1) % 3]["completion_ids"] for i in range(3)])):
        hidden = T.hidden_states(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])
        got = head.sequence_logps(hidden, batch[f"{prefix}labels"])
        for b, (e, completion) in enumerate(zip(examples, completions)):
            seq = torch.tensor([e["prompt_ids"] + completion])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            n = len(e["prompt_ids"])
            want = sum(logp[t - 1, seq[0, t]] for t in range(n, seq.shape[1]))
            torch.testing.assert_close(got[b].double(), want, rtol=0, atol=20 * LOGP_ATOL)


# --------------------------------------------------------------------------------------------- PEFT, checkpointing
def test_lora_policy_and_reference(seed):
    peft = pytest.importorskip("peft", reason="LoRA tests need peft")
    base = tiny("llama")
    frozen = copy.deepcopy(base)
    # init_lora_weights=False: random A and B, so the adapters change the output from the first step
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    ids, mask, labels = padded_batch()
    head = T.get_lm_head(model)
    policy = head.logprobs(T.hidden_states(model, ids, mask)[:, :-1], labels)
    with torch.no_grad():
        torch.testing.assert_close(policy.double(), model_logprobs(model, ids, mask, labels), rtol=0, atol=LOGP_ATOL)
        with model.disable_adapter():
            ref = head.logprobs(T.hidden_states(model, ids, mask)[:, :-1], labels)
        torch.testing.assert_close(ref.double(), model_logprobs(frozen, ids, mask, labels), rtol=0, atol=LOGP_ATOL)
    assert (policy - ref).abs().max() > 1e-3
    policy.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)


def test_lora_on_the_head_or_prompt_learning_is_refused():
    peft = pytest.importorskip("peft", reason="LoRA tests need peft")
    on_head = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="adapter or modules_to_save on the LM head"):
        T.get_lm_head(on_head)
    prefix = peft.get_peft_model(tiny("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prompt-learning"):
        T.get_backbone(prefix)


def test_gradient_checkpointing_gives_the_same_gradients(seed):
    model = tiny("llama").train()  # no dropout in these configs, so train mode is deterministic
    ids, mask, labels = padded_batch()

    def grads():
        lp = T.get_lm_head(model).logprobs(T.hidden_states(model, ids, mask)[:, :-1], labels)
        return torch.autograd.grad(lp.sum(), list(model.parameters()), allow_unused=True)

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert T.get_backbone(model).gradient_checkpointing
    assert_grads_close(grads(), plain)


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_compiled_model_is_run_compiled_by_hidden_states(how, seed):
    """``hidden_states`` calls a compiled model (``torch.compile(model)`` or ``model.compile()``) instead of its
    eager backbone: Dynamo hands the backbone's graph to the backend (counted here), once, reused on the next calls
    (no recompilation); values and gradients equal the eager model's, padded and packed."""
    from fastkto import packing as P

    model = tiny("llama_tied")
    eager = copy.deepcopy(model)
    graphs = []

    def backend(gm, example_inputs):  # a Dynamo backend that records each graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    if how == "torch.compile":
        run = torch.compile(model, backend=backend)
    else:
        model.compile(backend=backend)
        run = model
    with pytest.raises(ValueError, match="bypass .*compile"):
        T.get_backbone(run)  # calling the backbone module would run it eagerly
    ids, mask, labels = padded_batch()
    flat = ids[0:1, :8]
    cu = P.cu_seqlens_from_lengths([5, 3])
    for step in range(3):
        hidden = T.hidden_states(run, ids, mask)
        if step == 0:
            compiled = len(graphs)
            assert compiled >= 1 and any("embedding" in gm.code for gm in graphs), "the backbone was not compiled"
        lp = T.get_lm_head(run).logprobs(hidden[:, :-1], labels)
        got = torch.autograd.grad(lp.sum(), list(model.parameters()))
    assert len(graphs) == compiled, "later calls must reuse the compiled graph"
    want_lp = T.get_lm_head(eager).logprobs(T.hidden_states(eager, ids, mask)[:, :-1], labels)
    want = torch.autograd.grad(want_lp.sum(), list(eager.parameters()))
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=LOGP_ATOL)
    assert_grads_close(got, want)
    if how == "torch.compile":  # a copy of the hooked model captures its own backbone's output
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.model.norm.weight.mul_(2.0)
        twin_hidden = T.hidden_states(torch.compile(twin, backend=backend), ids, mask)
        torch.testing.assert_close(twin_hidden, T.hidden_states(twin, ids, mask), rtol=0, atol=1e-5)
        assert (twin_hidden - hidden).abs().max() > 1e-2
    before = len(graphs)
    packed = T.hidden_states(run, flat, cu_seqlens=cu)
    assert len(graphs) > before, "the packed call (other shapes and kwargs) is compiled too"
    torch.testing.assert_close(packed, T.hidden_states(eager, flat, cu_seqlens=cu), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- ZeRO-3
# Real DeepSpeed ZeRO-3 runs in tests/test_distributed.py (2 gloo processes); here, what needs no cluster.


class _Status:
    def __init__(self, name):
        self.name = name


def _partitioned_like_zero3(weight):
    """A parameter that looks the way ZeRO-3 leaves one between uses: empty data, ds_shape, ds_status."""
    part = torch.nn.Parameter(weight.clone())
    part.ds_shape, part.ds_status = weight.shape, _Status("NOT_AVAILABLE")
    part.data = torch.empty(0)
    return part


def test_zero3_partitioned_head_runs_inside_its_module_hooks(seed):
    """The log-probs run as the head module's forward, so hooks on that module (ZeRO-3's gather and release) wrap
    them: a pre-hook that gathers the weight and a post-hook that releases it give the unpartitioned result."""
    full = torch.randn(V, 16)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.randint(0, V, (2, 5))
    labels[0, :2] = -100
    want = T.LMHead(full).logprobs(hidden, labels)

    module = torch.nn.Linear(16, V, bias=False)
    module.weight = _partitioned_like_zero3(full)
    seen = []

    def gather(mod, args):
        seen.append(("gather", tuple(args[0].shape)))
        mod.weight.data, mod.weight.ds_status = full.clone(), _Status("AVAILABLE")

    def release(mod, args, out):
        seen.append("release")
        mod.weight.data, mod.weight.ds_status = torch.empty(0), _Status("NOT_AVAILABLE")

    module.register_forward_pre_hook(gather)
    module.register_forward_hook(release)
    head = T.LMHead(module.weight, module=module)
    assert T._is_partitioned(head.weight)
    got = head.logprobs(hidden, labels)
    assert seen == [("gather", (2, 5, 16)), "release"]
    assert "forward" not in vars(module) and T._is_partitioned(module.weight)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # get_lm_head finds a partitioned head by its ds_shape and records the module
    model = SimpleNamespace(get_output_embeddings=lambda: module)
    assert T._head_module(model) is module

    with pytest.raises(ValueError, match="no module to gather it"):
        T.LMHead(module.weight).logprobs(hidden, labels)
    # the partitioned weight itself, passed to the primitive or a loss module, holds no data: named as such
    import fastkto
    from fastkto.loss import DPOLoss

    for call in (lambda: fastkto.sequence_logps(hidden, module.weight, labels),
                 lambda: DPOLoss()(hidden, module.weight, labels, ref_logps=torch.zeros(2))):
        with pytest.raises(ValueError, match=r"weight is a DeepSpeed ZeRO-3 partitioned parameter.*get_lm_head"):
            call()


class _RootWrapper(torch.nn.Module):
    """A ``.module`` wrapper that, like FSDP1's root, starts its backward from a hook on its forward's outputs."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.pre_backward_calls = 0

    def forward(self, **kwargs):
        out = self.module(**kwargs)
        if out.logits.requires_grad:
            out.logits.register_hook(self._pre_backward)
        return out

    def _pre_backward(self, grad):
        self.pre_backward_calls += 1
        return grad


def test_fsdp1_root_output_joins_the_backward(monkeypatch, seed):
    """FSDP1 (recognised by type, though it forwards ``config`` to its module) is run, not unwrapped, and the
    root's forward outputs join the backward through a zero gradient, so its pre-backward hooks fire once; the
    gradients are those of the model alone. On CUDA, tests/test_fsdp1_cuda.py runs the real FSDP1."""
    model = tiny("llama_tied")
    wrapper = _RootWrapper(model)
    monkeypatch.setattr(T, "_is_fsdp1", lambda m: m is wrapper)
    assert T.unwrap_model(wrapper) is model and T._wrappers(wrapper) == ["_RootWrapper"]
    ids, mask, labels = padded_batch()
    params = list(model.parameters())
    want = torch.autograd.grad(T.get_lm_head(model).sequence_logps(T.hidden_states(model, ids, mask)[:, :-1],
                                                                   labels).sum(), params)
    hidden = T.hidden_states(wrapper, ids, mask)[:, :-1]
    assert wrapper.pre_backward_calls == 0
    got = torch.autograd.grad(T.get_lm_head(wrapper).sequence_logps(hidden, labels).sum(), params)
    assert wrapper.pre_backward_calls == 1
    assert_grads_close(got, want)
    with torch.no_grad():  # no graph: nothing joined
        T.hidden_states(wrapper, ids, mask)
    monkeypatch.setattr(T, "_is_fsdp1", lambda m: False)
    T.get_lm_head(wrapper).sequence_logps(T.hidden_states(wrapper, ids, mask)[:, :-1], labels).sum().backward()
    assert wrapper.pre_backward_calls == 1, "without the join the root's hook never fires (the test can fail)"


class _BreakingWrapper(torch.nn.Module):
    """A ``.module`` wrapper whose forward breaks Dynamo's graph, as DDP's does (Dynamo skips its inner call)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        torch._dynamo.graph_break()
        return self.module(**kwargs)


def test_hidden_states_of_a_wrapper_inside_a_compiled_function(seed):
    """``torch.compile`` of a function that calls ``hidden_states(wrapper, ...)``, a wrapper whose forward breaks the
    graph (DDP does): the compiled frame installed the capture hook again on every call (its lookup of the installed
    one is not guarded), so from the second call on each output was recorded twice and the call raised "called the
    backbone more than once" (found with a step compiled around DDP). Two calls, equal to eager in values and
    gradients, and one hook."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 1})).eval()
    wrapper = _BreakingWrapper(model)
    params = list(model.parameters())
    torch._dynamo.reset()
    try:
        run = torch.compile(lambda ids, mask: T.hidden_states(wrapper, ids, mask), backend="eager")
        for _ in range(2):  # a new batch each call: a stale output would show
            ids, mask, labels = padded_batch()
            want_hidden = T.hidden_states(model, ids, mask)
            want = torch.autograd.grad(T.get_lm_head(model).sequence_logps(want_hidden[:, :-1], labels).sum(),
                                       params)
            hidden = run(ids, mask)
            got = torch.autograd.grad(T.get_lm_head(wrapper).sequence_logps(hidden[:, :-1], labels).sum(), params)
            torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=1e-6)
            assert_grads_close(got, want)
        assert len(model.model._forward_hooks) == 1
    finally:
        torch._dynamo.reset()


def test_module_forward_swap_restores_an_instance_forward():
    """Wrappers (accelerate's hooks) set ``module.forward`` on the instance: it must survive fastkto's call."""
    module = torch.nn.Identity()
    wrapper = module.forward  # a bound method stored on the instance, as accelerate does
    module.forward = wrapper
    out = T._as_module_forward(module, lambda h: h * 2, torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0)) and vars(module)["forward"] is wrapper
    with pytest.raises(RuntimeError, match="boom"):
        T._as_module_forward(module, lambda h: (_ for _ in ()).throw(RuntimeError("boom")), torch.ones(1))
    assert vars(module)["forward"] is wrapper


def _zero3_trl_runs(tmp_path, *which: str) -> list[list[dict]]:
    """Two processes (gloo on 127.0.0.1) training with each of ``which`` in turn under DeepSpeed ZeRO-3; rank 0's log
    history of each. One pair of processes for all runs: starting one costs more than a run."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "zero3"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.zero3_trl_worker", str(tmp_path / "port"),
                                       str(out), *which], cwd=root, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return [json.loads(Path(f"{out}.{name}.json").read_text()) for name in which]


def test_trl_kto_trainer_under_deepspeed_zero3_matches_trl(tmp_path):
    """FastKTOTrainer and TRL's KTOTrainer, each on 2 processes with every parameter ZeRO-3 partitioned (the LM head
    included), log the same losses, rewards, log-probs and gradient norms over two steps."""
    pytest.importorskip("deepspeed", reason="deepspeed is installed by scripts/setup.sh (CI); optional elsewhere")
    theirs, ours = _zero3_trl_runs(tmp_path, "trl", "fastkto")
    steps = [m for m in ours if "loss" in m]
    assert len(steps) == 2 and steps[1]["rewards/margins"] != 0, "the second step must see the first one's update"
    # float32 on both sides; the heads differ in summation order only (as in test_trl_trainer_parity)
    _compare_logs(theirs, ours, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the real SmolLM2 GGUF
@pytest.fixture(scope="module")
def smollm2():
    folder, name = smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()


def test_smollm2_gguf_head(smollm2):
    """SmolLM2-135M-Instruct (Llama, tied embeddings, V = 49152), dequantized to float32 from the GGUF file."""
    head = T.get_lm_head(smollm2)
    assert head.weight is smollm2.get_input_embeddings().weight and head.weight.shape == (49152, 576)
    assert (head.bias, head.softcap, head.temperature) == (None, None, 1.0)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 6004, 665, 2]])
    # real weights give logits up to ~30, so float32 rounding is a few 1e-6; 1e-4 leaves room and still catches any
    # missing transform or misaligned position (those are O(1))
    assert T.verify_lm_head(smollm2, ids) < 1e-4


# ------------------------------------------------------------------------------------------------------------ TRL
trl_reason = "TRL parity tests need trl >= 1.16"


def _trl():
    pytest.importorskip("trl", reason=trl_reason)
    pytest.importorskip("datasets", reason=trl_reason)
    from fastkto.integrations import trl as fast_trl

    return fast_trl


ALL_FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def test_fastkto_head_matches_trls_fused_head(seed):
    fast_trl = _trl()
    from trl.trainer.utils import add_fused_lm_head

    base = tiny("gemma2_softcap")
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    add_fused_lm_head(theirs, outputs=ALL_FIELDS)
    fast_trl.add_fastkto_lm_head(ours, outputs=ALL_FIELDS)
    ids, mask, _ = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    a = theirs(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, num_items_in_batch=7)
    b = ours(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, num_items_in_batch=7)
    for field in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs", "loss"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=LOGP_ATOL, msg=field)
    assert torch.equal(b.is_top1, a.is_top1) and torch.equal(b.label_mask, a.label_mask)
    params = list(base.parameters())
    ga = torch.autograd.grad(a.log_probs.sum(), list(theirs.parameters()))
    gb = torch.autograd.grad(b.log_probs.sum(), list(ours.parameters()))
    assert len(params) == len(ga)
    assert_grads_close(gb, ga)
    # without fused_lm_head the original forward runs; pre-shifted labels are scored as given
    torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    c = ours(input_ids=ids, shift_labels=labels, fused_lm_head=True)
    assert c.log_probs.shape == labels.shape
    with pytest.raises(ValueError, match="outputs"):
        fast_trl.add_fastkto_lm_head(copy.deepcopy(base), outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="returned no router_logits"):  # a dense model has no router
        ours(input_ids=ids, labels=labels, fused_lm_head=True, output_router_logits=True)


def tiny_moe(arch: str, tok) -> torch.nn.Module:
    """A tiny random MoE causal LM (4 experts, 2 per token), built offline from its config class."""
    tf = transformers
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, pad_token_id=tok.pad_token_id)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16,
                                                        num_experts=4))
    if arch == "gpt_oss":
        return tf.GptOssForCausalLM(tf.GptOssConfig(**common, intermediate_size=32, num_local_experts=4,
                                                    layer_types=["sliding_attention", "full_attention"]))
    raise KeyError(arch)


def _trainers(kind, tmp_path, model=None, peft_config=None, fast_kwargs=None, **config):
    """TRL's trainer and fastkto's on identical copies of one tiny model (default: a Llama) and a tiny dataset.
    With ``peft_config`` the trainers get no ref_model (TRL then takes the base model without the adapter);
    ``fast_kwargs`` go to fastkto's trainer only."""
    fast_trl = _trl()
    import datasets
    import trl

    tok = make_char_tokenizer()
    if model is None:
        cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tok)}, pad_token_id=tok.pad_token_id)
        base = transformers.LlamaForCausalLM(cfg)
    else:
        base = tiny_moe(model, tok)
    if kind == "kto":
        rows = [{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}." if i % 2 else " no idea", "label": bool(i % 2)}
                for i in range(8)]
        classes, config_cls = (trl.KTOTrainer, fast_trl.FastKTOTrainer), trl.KTOConfig
    else:
        rows = [{"prompt": f"Q{i}: {i}+{i}?", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1}, maybe"}
                for i in range(8)]
        classes, config_cls = (trl.DPOTrainer, fast_trl.FastDPOTrainer), trl.DPOConfig
    data = datasets.Dataset.from_list(rows)
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                    max_steps=1, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", max_length=64,
                    seed=0, optim="sgd", learning_rate=0.5, disable_tqdm=True)  # SGD: one step moves both alike
    settings.update(config)
    extra = {"peft_config": peft_config} if peft_config is not None else {"ref_model": None}
    trainers = []
    for cls in classes:
        if peft_config is None:
            extra["ref_model"] = copy.deepcopy(base)
        own = (fast_kwargs or {}) if cls is classes[1] else {}
        trainers.append(cls(model=copy.deepcopy(base), args=config_cls(**settings), train_dataset=data,
                            eval_dataset=data, processing_class=tok, **extra, **own))
    return trainers


def _compare_logs(theirs, ours, rtol, atol):
    skip = ("runtime", "per_second")  # wall-clock numbers
    assert len(theirs) == len(ours)
    for a, b in zip(theirs, ours):
        assert a.keys() == b.keys()
        for key in a:
            if not any(s in key for s in skip):
                assert b[key] == pytest.approx(a[key], rel=rtol, abs=atol), key


@pytest.mark.parametrize(
    "kind, config, rtol, atol, param_atol",
    [
        # float32: both heads compute the same float32 sums; differences are summation order only
        ("kto", {"bf16": False}, 1e-5, 1e-5, 1e-6),
        # TRL's default bf16 autocast: both heads take bf16 inputs, but TRL's backward multiplies in bf16 where
        # fastkto accumulates in float32, so gradients differ at bf16 precision (measured: grad norm 5e-4 relative,
        # weights 5e-5 after the step, eval rewards 1.2e-4); the tolerances leave ~4x room
        ("kto", {"bf16": True}, 2e-3, 5e-4, 2e-4),
        ("dpo", {"bf16": False, "use_weighting": True}, 1e-5, 1e-5, 1e-6),
    ],
)
def test_trl_trainer_parity(kind, config, rtol, atol, param_atol, tmp_path):
    """One training step and one evaluation pass: same loss, same logged metrics, same updated weights."""
    theirs, ours = _trainers(kind, tmp_path, **config)
    calls = []
    original = T.fused_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "fused_logprobs", counting)
        for trainer in (theirs, ours):
            trainer.train()
            trainer.evaluate()
            if trainer is theirs:
                assert not calls  # TRL's own head never calls fastkto
        assert calls  # fastkto computed the Fast trainer's log-probs
    logged = [m for m in ours.state.log_history if "loss" in m or "eval_loss" in m]
    assert logged and all(m.get("eval_loss", m.get("loss")) > 0 for m in logged)
    _compare_logs(theirs.state.log_history, ours.state.log_history, rtol, atol)
    for (name, p), q in zip(theirs.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=param_atol, msg=name)


def test_fast_trainer_refuses_to_run_without_its_head(monkeypatch, tmp_path):
    fast_trl = _trl()
    import contextlib

    monkeypatch.setattr(fast_trl, "_fastkto_head_for", lambda module, padding_free=False: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="fastkto's head is not in use"):
        _trainers("kto", tmp_path, bf16=False)


# ---------------------------------------------------------------------------------------------------- the example
def _example_setup(tmp_path, rejected):
    """examples/train.py loaded as a module, a tiny Llama and its tokenizer saved in tmp_path / "model", and 12
    hh-style pairs in tmp_path / "pairs.jsonl" (``rejected(i)``: pair i's rejected answer). Returns (module, model)."""
    import importlib.util
    import json
    from pathlib import Path

    tok = make_char_tokenizer(CHAT_TEMPLATE)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tok)}))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"chosen": f"\n\nHuman: what is {i}+{i}?\n\nAssistant: {2 * i}",
             "rejected": f"\n\nHuman: what is {i}+{i}?\n\nAssistant: {rejected(i)}"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = importlib.util.spec_from_file_location("train_example", Path(__file__).parents[1] / "examples" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train, model


@pytest.mark.parametrize("loss, head, dtype", [("kto", "fastkto", "float32"), ("dpo", "naive", "float32"),
                                              ("kto", "fastkto", "bfloat16")])
def test_example_script_runs_end_to_end(loss, head, dtype, tmp_path):
    """examples/train.py on a tiny saved Llama and a small hh-style file: logs, evaluations and the checkpoint."""
    import json

    train, model = _example_setup(tmp_path, lambda i: "no idea, sorry")
    out = tmp_path / "run"
    summary = train.main([
        "--loss", loss, "--head", head, "--model", str(tmp_path / "model"), "--data", str(tmp_path / "pairs.jsonl"),
        "--steps", "2", "--batch", "2", "--eval-pairs", "4", "--eval-every", "1", "--max-length", "96",
        "--device", "cpu", "--dtype", dtype, "--out", str(out), "--lr", "1e-3", "--memory-every", "1",
        "--checkpoint", str(out / "checkpoint.pt"),
    ])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all("eval/rewards/margins" in r for r in log)
    assert all(r["train/loss"] > 0 and r["peak_mem_mib"] > 0 for r in log[1:])
    assert summary["eval_margin_start"] == 0.0 and summary["eval_margin_end"] != 0.0  # the policy moved
    # at the start the policy is the reference: every reward is 0, every pair a tie, counted one half (issue 22)
    assert summary["eval_accuracy_start"] == 0.5 and summary["eval_ties_start"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert "clamped" in config["log_notes"]["train/kl"]
    saved = torch.load(out / "checkpoint.pt")
    assert set(saved) == {n for n, _ in model.named_parameters()}


def test_example_accuracy_counts_ties_as_half():
    """examples/train.py's held-out pair accuracy: a win 1, a loss 0, a tie (equal rewards) 1/2, never a 0.0 for a
    policy that has not moved (issue 22)."""
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_ties", Path(__file__).parents[1] / "examples" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    policy_logps = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.0, 2.0])  # pairs (1, -1): win, (0, 0): tie, (2, 2): tie
    runner = SimpleNamespace(policy=torch.nn.Module(), head=None, sequence_logps=lambda m, h, b: policy_logps)
    got = train.evaluate(runner, [None], [torch.zeros(6)], beta=0.5)
    assert got["eval/rewards/accuracies"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert got["eval/rewards/ties"] == pytest.approx(2 / 3)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("script", ["train.py", "trl_kto_smollm2.py"])
def test_examples_keep_deepspeeds_accelerator_warning_out(script):
    """accelerate imports DeepSpeed whenever it is installed; on a machine without a GPU DeepSpeed then warns
    "Setting accelerator to CPU" in every example run (issue 22). The examples name the CPU first."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / script
    code = f"import runpy; runpy.run_path({str(path)!r}, run_name='probe'); import deepspeed"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    if torch.cuda.is_available():
        pytest.skip("with a GPU DeepSpeed finds it and does not warn")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr


# --------------------------------------------------------------------------- issue 13: what TRL's head computes too
@pytest.fixture
def one_thread():
    """TRL trainer runs on tiny models are fastest single-threaded on a shared 2-core machine; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_both(theirs, ours):
    for trainer in (theirs, ours):
        trainer.train()
        trainer.evaluate()
    return theirs.state.log_history, ours.state.log_history


@pytest.mark.parametrize("kind, arch", [("kto", "qwen3_moe"), ("kto", "gpt_oss"), ("dpo", "qwen3_moe"),
                                        ("dpo", "gpt_oss")])
def test_moe_router_aux_loss_matches_trl(kind, arch, tmp_path, one_thread):
    """TRL enables the MoE load-balancing loss by default (router_aux_loss_coef=None: the model's own coefficient);
    the Fast trainers compute it as TRL's head does, so MoE models train with the same logged metrics."""
    theirs, ours = _trainers(kind, tmp_path, model=arch, bf16=False)
    assert ours.aux_loss_enabled and theirs.aux_loss_enabled
    a, b = _train_both(theirs, ours)
    step = [m for m in b if "loss" in m][0]
    assert step["aux_loss"] > 0
    # float32 on both sides, the same backbone: the heads differ in summation order only
    _compare_logs(a, b, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(theirs.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_peft_prompt_learning_trains_like_trl(method, tmp_path, one_thread):
    """PEFT prompt learning prepends virtual tokens in PeftModel.forward and then calls the base model, where the
    head sits: the Fast trainers accept it and log what TRL logs."""
    peft = pytest.importorskip("peft", reason="prompt-learning tests need peft")
    if method == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)
    theirs, ours = _trainers("kto", tmp_path, peft_config=config, bf16=False)
    before = {n: p.clone() for n, p in ours.model.named_parameters() if p.requires_grad}
    a, b = _train_both(theirs, ours)
    _compare_logs(a, b, rtol=1e-5, atol=1e-6)
    changed = [n for n, p in ours.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all("prompt_encoder" in n for n in changed)


def test_entropy_is_stable_on_real_logits(smollm2):
    """TRL logs the mean per-token entropy; docs/training.md promises every logged metric within 1e-5. On the real
    SmolLM2 head (logits up to ~37) lse - sum(p z) in float32 is ~1e-3 off float64; the max-shifted form is not."""
    fast_trl = _trl()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 6004, 665, 2, 28, 4093,
                         198, 19556, 17, 2, 198, 1, 520, 9531, 198]])
    hidden = T.hidden_states(smollm2, ids)[0].detach()
    head = T.get_lm_head(smollm2)
    labels = ids[0].roll(-1)
    mask = torch.ones_like(labels, dtype=torch.bool)
    with torch.no_grad():
        got = fast_trl._metric_fields(head, hidden, labels, mask, ("entropy",), 1 << 20)["entropy"]
        def entropy64(z):
            logp = torch.log_softmax(z.double(), -1)
            return -(logp.exp() * logp).sum(-1)

        z32 = hidden @ head.weight.T
        want = entropy64(hidden.double() @ head.weight.double().T)
        textbook = torch.logsumexp(z32, -1) - (torch.softmax(z32, -1) * z32).sum(-1)
    # the reduction alone (float64 entropy of the same float32 logits): a few ulp of H <= 11 nats (measured 4e-7)
    assert (fast_trl._entropy(z32).double() - entropy64(z32)).abs().max().item() < 4e-6
    # against float64 logits: float32 logits round by up to ~4e-5 here (|z| <= 37, D = 576), which alone moves H by
    # ~2e-5 (measured 1.7e-5; TRL's own head 1.5e-5 on these tokens)
    err = (got.double() - want).abs().max().item()
    assert err < 3e-5, err
    assert (textbook.double() - want).abs().max().item() > 2e-4  # the fp32 cancellation this replaced (9.5e-4)


def test_fast_head_returns_every_field_trl_returns_with_its_gradients(seed):
    """Nothing TRL's head computes comes back as None or without gradient: entropy is differentiable (TRL's is),
    and aux_loss is there for MoE models; gradients through entropy match TRL's and float64."""
    fast_trl = _trl()
    from trl.trainer.utils import add_fused_lm_head

    tok = make_char_tokenizer()
    base = tiny_moe("qwen3_moe", tok).float()
    with torch.no_grad():
        base.lm_head.weight.normal_(0.0, 1.0)  # O(10) logits, so that entropies and their gradients are not flat
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    add_fused_lm_head(theirs, outputs=ALL_FIELDS)
    fast_trl.add_fastkto_lm_head(ours, outputs=ALL_FIELDS, metrics_workspace_bytes=4 * 3 * len(tok) * 5)  # 5 rows
    ids = torch.randint(6, len(tok), (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, output_router_logits=True)
    a, b = theirs(**kw), ours(**kw)
    for key in a.keys():
        assert b.get(key) is not None, f"{key} is None in fastkto's output but not in TRL's"
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=LOGP_ATOL)
    torch.testing.assert_close(b.entropy, a.entropy, rtol=0, atol=LOGP_ATOL)
    upstream = torch.randn(b.entropy.shape)
    ga = torch.autograd.grad((a.entropy * upstream).sum(), list(theirs.parameters()), allow_unused=True)
    gb = torch.autograd.grad((b.entropy * upstream).sum(), list(ours.parameters()), allow_unused=True)
    # two float32 heads that sum in different orders; the entropy's gradient (O(10) logits) carries their rounding
    # back through the backbone's layers, amplified: over 300 seeds the worst backbone parameter differed by 3.0e-5
    # of its largest entry (5% of seeds above GRAD_RTOL), so 1e-4 here; the head itself is held to GRAD_RTOL below
    assert_grads_close(gb, ga, rtol=1e-4)
    # and against float64 autograd through the full logits: the head's weight gradient
    hidden = T.hidden_states(ours, ids, mask)[:, :-1].detach()
    w64 = ours.lm_head.weight.detach().double().requires_grad_()
    logp = torch.log_softmax(hidden.double() @ w64.T, -1)
    ent = -(logp.exp() * logp).sum(-1) * (labels[:, 1:] != -100)
    (g64,) = torch.autograd.grad((ent * upstream).sum(), w64)
    gw = gb[[n for n, _ in ours.named_parameters()].index("lm_head.weight")]
    assert (gw.double() - g64).abs().max() <= GRAD_RTOL * g64.abs().max()


# ------------------------------------------------------------------------------ issue 13: the GGUF through TRL
def test_gguf_model_becomes_plain_and_trainable(smollm2):
    """transformers marks a GGUF-loaded model quantized (its weights are float32), and Trainer refuses it; the plain
    copy has the same weights and outputs and passes Trainer's check."""
    from transformers.trainer_utils import validate_quantization_for_training

    assert smollm2.is_quantized
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(smollm2)
    plain = T._plain_model(smollm2)
    validate_quantization_for_training(plain)
    assert not getattr(plain, "is_quantized", False) and getattr(plain, "hf_quantizer", None) is None
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight  # still tied
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, smollm2(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="local files only"):
        T.load_gguf_model("/nonexistent", "model.gguf")


@pytest.mark.slow
def test_trl_example_on_the_shipped_gguf(tmp_path):
    """examples/trl_kto_smollm2.py: FastKTOTrainer on the real SmolLM2 GGUF and hh-rlhf rows, two steps."""
    import importlib.util
    from pathlib import Path

    smollm2_gguf()
    _trl()
    spec = importlib.util.spec_from_file_location("trl_example",
                                                  Path(__file__).parents[1] / "examples" / "trl_kto_smollm2.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from fastkto.assets import idle_cores

    # the cores other programs leave idle (CI's 2 when alone: 42 -> 37 s here), one on a busy machine; --threads sets
    # torch's count for the process, so it is restored for the tests after this one
    before = torch.get_num_threads()
    try:
        result = example.main(["--steps", "2", "--batch", "2", "--examples", "8", "--threads", str(idle_cores()),
                               "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    steps = [m for m in result["log_history"] if "loss" in m]
    assert len(steps) == 2 and all(0 < m["loss"] < 1 and m["grad_norm"] > 0 for m in steps)
    # the second step sees the first one's update: the policy has moved away from the reference
    assert steps[1]["rewards/chosen"] != 0 or steps[1]["rewards/rejected"] != 0
    assert not list(tmp_path.glob("checkpoint-*"))  # save_strategy="no": nothing written


# --------------------------------------------------------------------- issue 13: examples/train.py's first run
def test_example_script_defaults_suit_a_first_run(tmp_path):
    """Run as a user would (a subprocess, no --out, no --checkpoint): nothing is written into the source tree, no
    538 MB checkpoint unless asked, no profiler lines on the console, every --help entry shows its default, and the
    progress bar says its margin is the held-out one."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join((str(root / "src"), str(root)))}
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                               check=True).stdout
    options = [line.split()[0] for line in help_text.splitlines() if line.strip().startswith("--")]
    assert len(options) > 20
    entries = help_text.split("options:", 1)[1]
    for block in entries.split("\n  -")[1:]:
        name = block.split()[0].lstrip("-")
        if name.startswith("h,"):
            continue
        assert "(default:" in " ".join(block.split()), f"--{name} shows no default"

    tok = make_char_tokenizer(CHAT_TEMPLATE)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tok)}))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"chosen": f"\n\nHuman: what is {i}+{i}?\n\nAssistant: {2 * i}",
             "rejected": f"\n\nHuman: what is {i}+{i}?\n\nAssistant: no idea, sorry"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {p for p in (root / "examples").rglob("*")}
    run = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "model"), "--data",
                          str(tmp_path / "pairs.jsonl"), "--steps", "4", "--batch", "2", "--eval-pairs", "4",
                          "--eval-every", "2", "--max-length", "96"], capture_output=True, text=True, env=env,
                         cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p for p in (root / "examples").rglob("*")} == before, "the run wrote into the source tree"
    out = Path(json.loads(run.stdout[run.stdout.index("{"):])["out"])
    assert tmp_path in out.parents and (out / "log.jsonl").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.pt")), "a checkpoint was saved without --checkpoint"
    console = run.stdout + run.stderr
    assert "profiler_start" not in console and "CPUAllocator" not in console, console[-2000:]
    assert "eval_margin=" in console and " margin=" not in console


def test_example_threads_default_to_the_idle_cores(monkeypatch):
    # examples/train.py --threads auto: the cores other programs leave idle when it starts (the backbone's short
    # parallel operations stall on a core another program holds)
    import importlib.util
    import os
    from pathlib import Path

    import psutil

    spec = importlib.util.spec_from_file_location("train_threads", Path(__file__).parents[1] / "examples" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [95.0] + [3.0] * ((os.cpu_count() or 1) - 1))
    assert train.idle_cores() == max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [99.0] * (os.cpu_count() or 1))
    assert train.idle_cores() == 1
    assert train.parse_args([]).threads == "auto" and train.parse_args(["--threads", "2"]).threads == "2"
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit):
            train.parse_args(["--threads", bad])


# ---------------------------------------------------------------------------------- issue 14: packed batches
from fastkto import packing as P  # noqa: E402
from fastkto.loss import KTOLoss  # noqa: E402

PACKED_ARCHS = {
    # (builder, attention implementations): Gemma-2 with a sliding window shorter than the rows and attention
    # soft-capping (eager only), Mistral with a sliding window, GPT-2's absolute positions
    "llama": (lambda: tiny("llama"), ("eager", "sdpa")),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)), ("eager", "sdpa")),
    "gemma2_sliding": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, head_dim=8, final_logit_softcapping=3.0, sliding_window=4)), ("eager",)),
    "mistral_sliding": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=4)),
                        ("eager", "sdpa")),
    "gpt2": (lambda: tiny("gpt2"), ("eager", "sdpa")),
    "phi_bias": (lambda: tiny("phi_bias"), ("sdpa",)),
}
PACKED_LENGTHS = [6, 1, 9, 3]


def _rows_padded_packed(lengths, generator=None):
    rows = [torch.randint(3, V, (n,), generator=generator) for n in lengths]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask, torch.cat(rows)[None], P.cu_seqlens_from_lengths(lengths)


@pytest.mark.parametrize("arch", list(PACKED_ARCHS))
def test_packed_hidden_states_equal_the_padded_rows(arch, seed, one_thread):
    """Each packed row's hidden states are its padded row's (to float32 rounding: the same products in matmuls of
    other shapes), with either layout marker, under every attention implementation the model offers."""
    build, impls = PACKED_ARCHS[arch]
    ids, mask, flat, cu = _rows_padded_packed(PACKED_LENGTHS)
    for impl in impls:
        torch.manual_seed(seed)
        model = build().eval()
        model.set_attn_implementation(impl)
        with torch.no_grad():
            want = T.hidden_states(model, ids, mask)[mask.bool()]
            by_cu = T.hidden_states(model, flat, cu_seqlens=cu)
            by_pos = T.hidden_states(model, flat, position_ids=P.position_ids_from_cu_seqlens(cu)[None])
            # an all-ones mask is dropped (transformers would otherwise not see the packing)
            with_mask = T.hidden_states(model, flat, torch.ones_like(flat), cu_seqlens=cu)
            crossed = T.get_backbone(model)(input_ids=flat, use_cache=False).last_hidden_state  # no layout at all
        assert by_cu.shape == (1, flat.shape[1], 32)
        for got in (by_cu, by_pos, with_mask):
            torch.testing.assert_close(got[0], want, rtol=0, atol=2e-5, msg=impl)
        # the layout matters: one unmarked sequence attends across the rows (the test would catch a lost layout)
        assert (crossed[0] - want).abs().max() > 1e-2


def test_packed_hidden_states_refuse_models_that_would_mix_rows(one_thread):
    """OPT builds its attention mask without position_ids: packed rows would attend to each other. The call raises
    instead of returning mixed rows; a single sequence has nothing to mix and runs."""
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32))
    _, _, flat, cu = _rows_padded_packed([3, 4])
    with pytest.raises(NotImplementedError, match="OPTModel .* the 2 packed sequences would attend to each other"):
        T.hidden_states(model.eval(), flat, cu_seqlens=cu)
    T.hidden_states(model, flat, cu_seqlens=P.cu_seqlens_from_lengths([7]))


def test_packed_hidden_states_reject_inconsistent_layouts():
    model = tiny("llama")
    ids, mask, flat, cu = _rows_padded_packed([3, 4])
    pos = P.position_ids_from_cu_seqlens(cu)[None]
    cases = [
        (dict(input_ids=ids, cu_seqlens=cu), r"input_ids of shape \(1, T_total\)"),
        (dict(input_ids=flat, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 0]]), cu_seqlens=cu),
         "a packed batch takes no attention_mask"),
        (dict(input_ids=flat, cu_seqlens=cu, position_ids=torch.arange(7)[None]),
         "position_ids and cu_seqlens disagree"),
        (dict(input_ids=flat, cu_seqlens=torch.tensor([0, 3, 6])), r"cu_seqlens must end at .* 7 \(input_ids's length"),
        (dict(input_ids=flat, position_ids=pos[:, :6]), r"position_ids must have shape \(1, 7\)"),
        (dict(input_ids=flat, position_ids=torch.tensor([[0, 1, 2, 0, 2, 3, 4]])), "count up by 1"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            T.hidden_states(model, kwargs.pop("input_ids"), **kwargs)
    # a padded batch with explicit positions stays padded (left padding: positions restart only under the mask)
    left = torch.tensor([[0, 5, 6], [7, 8, 9]])
    left_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = T.hidden_states(model, left, left_mask, position_ids=torch.tensor([[0, 0, 1], [0, 1, 2]]))
    assert out.shape == (2, 3, 32)


def test_packed_positions_with_a_zero_in_the_mask_are_refused_not_mixed(seed):
    """Issue 22: positions restarting at 0 mark a packed row even when an attention mask with zeros comes along;
    such a batch used to be run as one padded row whose two sequences attended to each other. It is refused, as
    the same batch marked with cu_seqlens is; left-padded batches (positions restart only under the mask's
    zeros, transformers' generate-style [1, 1, 0, 1, ...]) stay padded and equal the unpadded row."""
    model = tiny("llama")
    ids = torch.randint(3, V, (1, 10))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    for kwargs in (dict(position_ids=positions), dict(cu_seqlens=torch.tensor([0, 4, 10]))):
        with pytest.raises(ValueError, match="a packed batch takes no attention_mask"):
            T.hidden_states(model, ids, mask, **kwargs)
    left = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[:, :5]], 1)
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    for pad_positions in ([1, 1], [0, 0]):
        pos = torch.tensor([pad_positions + [0, 1, 2, 3, 4]])
        with torch.no_grad():
            got = T.hidden_states(model, left, left_mask, position_ids=pos)[0, 2:]
            want = T.hidden_states(model, ids[:, :5])[0]
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def _kto_step(model, ref_model, batch, packed):
    """One KTO step's loss (policy with gradient, reference and KL pairs without) from a collator batch."""
    def hidden(m, prefix, grad):
        with torch.set_grad_enabled(grad):
            if packed:
                return T.hidden_states(m, batch[f"{prefix}input_ids"], cu_seqlens=batch[f"{prefix}cu_seqlens"])
            return T.hidden_states(m, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])

    head, ref_head = T.get_lm_head(model), T.get_lm_head(ref_model)
    layout = {"cu_seqlens": batch["cu_seqlens"], "kl_cu_seqlens": batch["kl_cu_seqlens"]} if packed else {}
    return KTOLoss(beta=0.5, backend="torch", softcap=head.softcap, temperature=head.temperature)(
        hidden(model, "", True), head.weight, batch["labels"], batch["desirable"],
        ref_hidden=hidden(ref_model, "", False), ref_weight=ref_head.weight, ref_bias=ref_head.bias,
        kl_hidden=hidden(model, "kl_", False), kl_labels=batch["kl_labels"],
        kl_ref_hidden=hidden(ref_model, "kl_", False),
        bias=head.bias, **layout)


def _kto_step_float64(model, ref_model, batch):
    """The step in float64 through the materialized logits (tests/reference.py) and fastkto's loss math, each row
    run on its own (no padding, no packing: what both layouts must reproduce; a padded float64 Gemma-2 gives NaN)."""
    from fastkto.loss import kto_kl, kto_loss
    from tests.reference import reference_sequence_logps

    def logps(m, prefix):
        head = T.get_lm_head(m)
        out = []
        for ids, mask, labels in zip(*(batch[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "labels"))):
            n = int(mask.sum())
            hidden = T.hidden_states(m, ids[None, :n])
            out.append(reference_sequence_logps(hidden, head.weight, labels[None, :n], bias=head.bias,
                                                softcap=head.softcap, temperature=head.temperature))
        return torch.cat(out)

    policy = logps(model, "")
    with torch.no_grad():
        ref, z0 = logps(ref_model, ""), kto_kl(logps(model, "kl_"), logps(ref_model, "kl_"))
    return kto_loss(policy, ref, batch["desirable"], kl=z0, beta=0.5)


@pytest.mark.parametrize("arch, attention", [("llama", "eager"), ("llama", "varlen"), ("gemma2_sliding", "eager"),
                                             ("gpt2", "sdpa")])
def test_packed_kto_step_equals_padded_float64(arch, attention, seed, one_thread):
    """A whole KTO step through a tiny model, packed by the collator, against the same step of a float64 copy (and
    the padded float32 step): loss, metrics and every parameter's gradient, to float32 rounding. A row of one
    prompt and one completion token included."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PACKED_ARCHS[arch][0]().eval()
    model.set_attn_implementation("sdpa" if attention == "varlen" else attention)
    if attention == "varlen":
        T.use_varlen_sdpa(model)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    lengths = [(1, 1), (5, 3), (2, 6), (7, 2)]
    examples = [{"prompt_ids": torch.randint(3, V, (n,), generator=g).tolist(),
                 "completion_ids": torch.randint(3, V, (m,), generator=g).tolist(), "label": i % 2 == 0}
                for i, (n, m) in enumerate(lengths)]
    padded_out = _kto_step(model, ref_model, D.KTOCollator(pad_token_id=0)(examples), packed=False)
    padded_out.loss.backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = _kto_step(model, ref_model, D.KTOCollator(pad_token_id=0, packed=True)(examples), packed=True)
    out.loss.backward()
    model64, ref64 = copy.deepcopy(model).double(), copy.deepcopy(ref_model).double()
    model64.zero_grad()
    want = _kto_step_float64(model64, ref64, D.KTOCollator(pad_token_id=0)(examples))
    want.loss.backward()
    for field in ("loss", "kl", "policy_logps", "ref_logps"):
        torch.testing.assert_close(getattr(out, field).double(), getattr(want, field), rtol=0, atol=5e-5, msg=field)
    for key, value in want.metrics().items():
        assert out.metrics()[key] == pytest.approx(value, abs=5e-5), key
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), model64.parameters())]
    assert all(g is not None for _, g, _ in grads)
    # float32 rounding in the shared backward leaves absolute errors that follow the gradient flow (the largest
    # parameter gradient), not a parameter's own size: q / k projections of these near-uniform attentions get 1e-5
    # of the flow, and one CI seed left them 2e-9 of it (1.6e-4 of their own). So each parameter is held to 1e-4 of
    # its own scale, but of no less than 1e-3 of the flow's (over 41 seeds the worst error was 7.5e-6 of the flow).
    flow = max(ref.abs().max() for _, _, ref in grads)
    for (name, got, ref), padded_grad in zip(grads, padded_grads):
        scale = torch.maximum(ref.abs().max(), 1e-3 * flow).clamp(min=1e-12)
        assert ((got.double() - ref).abs().max() / scale) < 1e-4, name
        assert ((got - padded_grad).abs().max() / scale) < 1e-4, name
    torch.testing.assert_close(out.loss, padded_out.loss, rtol=0, atol=5e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral_sliding", "gpt2", "phi_bias"])
def test_varlen_sdpa_runs_each_packed_row_on_its_own(arch, seed, one_thread, monkeypatch):
    """use_varlen_sdpa: one causal SDPA per packed row and layer, the rows equal to the padded run; padded calls
    unchanged (the same SDPA with the same mask); a sliding window shorter than a row falls back to the dense mask."""
    torch.manual_seed(seed)
    model = PACKED_ARCHS[arch][0]().eval()
    model.set_attn_implementation("sdpa")
    ids, mask, flat, cu = _rows_padded_packed(PACKED_LENGTHS)
    with torch.no_grad():
        before = T.hidden_states(model, ids, mask)
    assert T.use_varlen_sdpa(model) is model and model.config._attn_implementation == T.VARLEN_SDPA
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape[2]) or sdpa(q, *a, **k))
    with torch.no_grad():
        padded_rows = T.hidden_states(model, ids, mask)
        n_padded = len(calls)
        got = T.hidden_states(model, flat, cu_seqlens=cu)[0]
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    assert torch.equal(padded_rows, before) and n_padded == layers
    packed_calls = calls[n_padded:]
    if arch == "mistral_sliding":  # window 4 < rows of 6 and 9: the dense mask keeps the window
        assert packed_calls == [flat.shape[1]] * layers
    else:
        assert packed_calls == PACKED_LENGTHS * layers
    torch.testing.assert_close(got, before[mask.bool()], rtol=0, atol=2e-5)


def test_varlen_sdpa_under_gradient_checkpointing_and_its_limits(seed, one_thread):
    """Gradient checkpointing recomputes the layers with the same (persistent) attention: the same gradients. An
    eager model is refused by name."""
    model = tiny("llama")
    T.use_varlen_sdpa(model)
    _, _, flat, cu = _rows_padded_packed(PACKED_LENGTHS)
    grads = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model).train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        T.hidden_states(m, flat, cu_seqlens=cu).pow(2).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    eager = tiny("llama")
    eager.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="use_varlen_sdpa needs a model running SDPA attention.*'eager'"):
        T.use_varlen_sdpa(eager)


def test_packed_hidden_states_bf16_within_its_rounding(seed, one_thread):
    """A bf16 model: packed rows equal padded rows to bf16 rounding of O(1) activations (a few bf16 ulps: the two
    layouts round different matmul blockings)."""
    model = tiny("llama").to(torch.bfloat16)
    ids, mask, flat, cu = _rows_padded_packed(PACKED_LENGTHS)
    with torch.no_grad():
        want = T.hidden_states(model, ids, mask)[mask.bool()].float()
        got = T.hidden_states(model, flat, cu_seqlens=cu)[0].float()
    assert got.dtype == torch.float32 and (got - want).abs().max() <= 4 * 2**-8 * want.abs().max()


def test_smollm2_packed_rows_equal_padded_rows(smollm2, one_thread):
    """SmolLM2-135M (30 layers, real weights, SDPA): three rows of a real chat, packed vs padded."""
    ids = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198], [1, 4093, 198, 6004, 665, 2], [1, 9690]]
    padded_ids = torch.full((3, 10), 2)
    mask = torch.zeros_like(padded_ids)
    for i, r in enumerate(ids):
        padded_ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    flat = torch.tensor([sum(ids, [])])
    with torch.no_grad():
        want = T.hidden_states(smollm2, padded_ids, mask)[mask.bool()]
        got = T.hidden_states(smollm2, flat, cu_seqlens=P.cu_seqlens_from_lengths([10, 6, 2]))[0]
        T.use_varlen_sdpa(smollm2)
        try:
            varlen = T.hidden_states(smollm2, flat, cu_seqlens=P.cu_seqlens_from_lengths([10, 6, 2]))[0]
        finally:
            smollm2.set_attn_implementation("sdpa")  # the fixture is shared
    # real weights give activations up to ~1e2 here; float32 rounding through 30 layers stays well below 1e-4 of it
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (varlen - want).abs().max() <= 1e-4 * want.abs().max()
    head = T.get_lm_head(smollm2)
    labels = torch.tensor([sum([r[1:] + [-100] for r in ids], [])])
    cu = P.cu_seqlens_from_lengths([10, 6, 2])
    torch.testing.assert_close(head.sequence_logps(got[None], labels, cu_seqlens=cu),
                               head.sequence_logps(want[None], labels, cu_seqlens=cu), rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind, arch", [("kto", None), ("dpo", None), ("kto", "qwen3_moe")])
def test_trl_padding_free_matches_trl(kind, arch, tmp_path, one_thread):
    """FastKTOTrainer(padding_free=True) and FastDPOTrainer with DPOConfig(padding_free=True): the backbone runs
    on the packed rows (checked), and loss, logged metrics and the updated weights equal TRL's padded run. The MoE
    case: the router's load-balancing loss over the packed tokens equals the padded batch's masked one."""
    if kind == "kto":  # TRL's KTOTrainer has no padding-free mode: only fastkto's gets one
        theirs, ours = _trainers(kind, tmp_path, model=arch, bf16=False, fast_kwargs={"padding_free": True})
    else:  # TRL 1.16's DPOTrainer warns and falls back to padding: the padded reference run
        theirs, ours = _trainers(kind, tmp_path, model=arch, bf16=False, padding_free=True)
        assert not theirs.padding_free and ours.args.padding_free
    assert ours.padding_free
    # SDPA models switch to the per-sequence attention (the reference too: TRL patches it with the same head)
    assert ours.model.config._attn_implementation == ours.ref_model.config._attn_implementation == T.VARLEN_SDPA
    shapes = []
    hook = T.get_backbone(ours.model).register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    a, b = _train_both(theirs, ours)
    hook.remove()
    assert shapes and all(s[0] == 1 for s in shapes)  # every policy forward ran packed
    if arch is not None:
        assert [m for m in b if "loss" in m][0]["aux_loss"] > 0
    _compare_logs(a, b, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(theirs.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_trl_padding_free_is_checked(tmp_path):
    fast_trl = _trl()
    with pytest.raises(TypeError, match="padding_free must be a bool"):
        fast_trl.FastKTOTrainer(model=tiny("llama"), padding_free="yes")


@pytest.mark.parametrize("loss, head, extra", [("kto", "fastkto", []), ("dpo", "naive", []),
                                               ("dpo", "fastkto", ["--max-tokens", "400"])])
def test_example_script_packed_trains_like_padded(loss, head, extra, tmp_path, one_thread):
    """examples/train.py --packed: the same batches as the padded run, so the same losses and evaluations (to
    float32 rounding); with --max-tokens the batches are filled to the budget (and logged)."""
    import json

    train, _ = _example_setup(tmp_path, lambda i: "no idea" + "!" * (i % 4))  # rejected lengths vary: padding
    logs = {}
    for packed in ([], ["--packed"]):
        out = tmp_path / f"run{len(packed)}"
        train.main(["--loss", loss, "--head", head, "--model", str(tmp_path / "model"), "--data",
                    str(tmp_path / "pairs.jsonl"), "--steps", "2", "--batch", "2", "--eval-pairs", "4",
                    "--eval-every", "1", "--max-length", "96", "--device", "cpu", "--out", str(out), "--lr", "1e-3",
                    "--memory-every", "100", "--threads", "1", *extra, *packed])
        logs[bool(packed)] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs[False]) == len(logs[True]) == 3 and all("train/loss" in r for r in logs[True][1:])
    for a, b in zip(logs[False], logs[True]):
        for key in ("train/loss", "eval/rewards/margins", "eval/rewards/chosen"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
        if "tokens" in a:
            assert a["tokens"] == b["tokens"] and a["sequences"] == b["sequences"]  # no padding in either count
    if extra:
        assert all(r["tokens"] <= 400 for r in logs[True][1:]) and logs[True][1]["sequences"] > 4
