"""The static-cache rollout path equals plain generate; on CUDA it sees updated weights."""

from __future__ import annotations

import copy

import pytest
import torch

from appo.data.collate import encode_prompts
from appo.rl.rollout import generate, pad_to_bucket, resolve_cache, token_logprobs


@pytest.fixture()
def perturbed_policy(tiny_policy):
    model, processor = tiny_policy
    model = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():  # a random init answers one token forever; perturb for varied text
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, processor


def test_resolve_cache():
    assert resolve_cache("auto", torch.device("cpu")) == "dynamic"
    assert resolve_cache("auto", torch.device("cuda")) == "static"
    assert resolve_cache("static", torch.device("cpu")) == "static"
    with pytest.raises(ValueError, match="rollout cache"):
        resolve_cache("paged", torch.device("cpu"))


def test_pad_to_bucket_left_pads_to_a_multiple():
    inputs = {"input_ids": torch.ones(2, 70, dtype=torch.long),
              "attention_mask": torch.ones(2, 70, dtype=torch.long)}
    out = pad_to_bucket(inputs, 64, pad_id=0)
    assert out["input_ids"].shape == (2, 128)
    assert out["attention_mask"][:, :58].sum() == 0 and out["attention_mask"][:, 58:].all()
    assert pad_to_bucket(out, 64, 0)["input_ids"].shape == (2, 128)


def test_static_cache_greedy_equals_dynamic(perturbed_policy, synthetic_data):
    model, processor = perturbed_policy
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["test"][:3], store)
    dyn = generate(model, processor, batch, max_new_tokens=10, greedy=True, cache="dynamic")
    sta = generate(model, processor, batch, max_new_tokens=10, greedy=True, cache="static",
                   bucket=64)
    assert sta.prompt_ids.shape[1] % 64 == 0
    assert torch.equal(dyn.response_ids, sta.response_ids)
    assert dyn.texts == sta.texts and len(set(dyn.texts)) > 1
    torch.testing.assert_close(dyn.logprobs, sta.logprobs, atol=1e-5, rtol=0)
    with torch.no_grad():  # the extra left padding changes nothing in the scoring forward
        logp, _ = token_logprobs(model, sta.model_inputs(), sta.response_ids)
    torch.testing.assert_close(logp * sta.response_mask, sta.logprobs, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_static_decoding_sees_updated_weights(perturbed_policy, synthetic_data):
    model, processor = perturbed_policy
    model = model.cuda()
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["test"][:2], store)
    generate(model, processor, batch, max_new_tokens=8, greedy=True, cache="static")
    with torch.no_grad():  # an "optimizer step" that changes the greedy answer
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = generate(model, processor, batch, max_new_tokens=8, greedy=True, cache="static")
    reference = generate(model, processor, batch, max_new_tokens=8, greedy=True, cache="dynamic")
    assert torch.equal(after.response_ids, reference.response_ids)
