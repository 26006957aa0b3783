"""FSDP1 (``FullyShardedDataParallel``) around a transformers Llama, through ``hidden_states`` and ``get_lm_head``.

FSDP1 refuses a CPU-only machine ("needs a non-CPU accelerator device"), so these tests run only on CUDA (the GPU
check's device-tests step). One GPU gives one rank: FSDP1 then runs as NO_SHARD (it says so in a warning), so what
is tested is that the wrapper's own forward runs (its hooks build the flat parameters' views and register the
post-backward reduction) and that gradients reach every parameter through them, tied head included; the sharded
all-gather of several ranks is FSDP2's test on gloo (tests/test_distributed.py), which FSDP1 cannot run on CPUs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs a CUDA device")


@pytest.fixture(scope="module")
def nccl_group():
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield dist.group.WORLD
    dist.destroy_process_group()


def _llama(tied: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).cuda()


def _loss(model, ids, labels, desirable, ref_logps):
    import fastkto.integrations.transformers as T
    from fastkto.loss import kto_loss

    hidden = T.hidden_states(model, ids)[:, :-1]
    logps = T.get_lm_head(model).sequence_logps(hidden, labels)
    return kto_loss(logps, ref_logps, desirable, kl=0.5, beta=0.5).loss


@pytest.mark.parametrize("use_orig_params", [True, False], ids=["orig-params", "flat-params"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied-head", "tied-head"])
def test_fsdp1_cuda_kto_steps_match_the_plain_model(nccl_group, tied, use_orig_params):
    """Two SGD steps of a KTO loss through ``hidden_states(fsdp_model)`` equal the same steps of the plain model
    (each decoder layer a unit, the root holding embeddings, norm and head, as a transformer auto-wrap policy
    makes it); a tied head stays tied."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = _llama(tied, seed=3)
    plain = copy.deepcopy(model)
    initial = {name: p.detach().clone() for name, p in plain.named_parameters()}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one rank: FSDP1 warns that it runs as NO_SHARD
        fsdp = FSDP(model, auto_wrap_policy=policy, use_orig_params=use_orig_params, device_id=0,
                    process_group=nccl_group)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (plain, fsdp)]
    gen = torch.Generator().manual_seed(4)
    for step in range(2):
        ids = torch.randint(0, 97, (4, 9), generator=gen).cuda()
        labels = ids[:, 1:].clone()
        labels[:, :2] = -100
        desirable = torch.tensor([True, False, True, False], device="cuda")
        ref_logps = (-40.0 + 5.0 * torch.randn(4, generator=gen)).cuda()
        for m, opt in zip((plain, fsdp), opts):
            _loss(m, ids, labels, desirable, ref_logps).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with FSDP.summon_full_params(fsdp):
            # summon_full_params exposes the original parameters under the wrappers' prefixes
            got = {name.replace("_fsdp_wrapped_module.", ""): p for name, p in fsdp.module.named_parameters()
                   if "flat_param" not in name}
            assert sorted(got) == sorted(initial), sorted(set(got) ^ set(initial))
            for name, want in plain.named_parameters():
                # fp32 on both sides; the only difference is the order of a few float32 sums
                torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
            moved = max((got[name] - p0).abs().max().item() for name, p0 in initial.items())
            assert moved > 1e-3, "the FSDP1 model did not train (a comparison that could not fail)"
            if tied:
                inner = fsdp.module
                torch.testing.assert_close(inner.lm_head.weight, inner.model.embed_tokens.weight, rtol=0, atol=0)
