"""The rollout engine: sampling maths by hand, prefill-shared decoding equal to plain ``generate``,
sampling log-probs equal to the scoring forward, and compiled static decoding that sees updated
weights without recompiling."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from appo.data.collate import encode_prompts
from appo.engine import decoding, rollout
from appo.engine.decoding import Sampling, sample_next, top_p_filter
from appo.engine.rollout import (
    generate,
    media_token_ids,
    pad_to_bucket,
    repeat_prompts,
    resolve_cache,
    row_bucket,
    stop_token_ids,
    token_logprobs,
)


@pytest.fixture(scope="module")
def perturbed_policy(tiny_policy):
    model, processor = tiny_policy
    model = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():  # a random init answers one token forever; perturb for varied text
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model, processor


def test_resolve_cache():
    assert resolve_cache("auto", torch.device("cpu")) == "dynamic"
    assert resolve_cache("auto", torch.device("cuda")) == "static"
    assert resolve_cache("static", torch.device("cpu")) == "static"
    with pytest.raises(ValueError, match="rollout cache"):
        resolve_cache("paged", torch.device("cpu"))


def test_pad_to_bucket_left_pads_to_a_multiple():
    inputs = {"input_ids": torch.ones(2, 70, dtype=torch.long),
              "attention_mask": torch.ones(2, 70, dtype=torch.long),
              "mm_token_type_ids": torch.full((2, 70), 2, dtype=torch.long)}
    out = pad_to_bucket(inputs, 64, pad_id=0)
    assert out["input_ids"].shape == (2, 128) and out["mm_token_type_ids"].shape == (2, 128)
    assert out["attention_mask"][:, :58].sum() == 0 and out["attention_mask"][:, 58:].all()
    assert out["mm_token_type_ids"][:, :58].sum() == 0
    assert pad_to_bucket(out, 64, 0)["input_ids"].shape == (2, 128)


def test_row_bucket_is_the_next_power_of_two():
    assert [row_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[math.log(0.15), math.log(0.5), math.log(0.05), math.log(0.3)]])
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.7
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.81) == [True, True, False, True]
    assert kept(0.01) == [False, True, False, False]  # the top token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sample_next_log_prob_ignores_suppression_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    token, logp = sample_next(logits, Sampling(greedy=True))
    assert token.tolist() == [0]
    assert logp.item() == pytest.approx(2.0 - math.log(math.e ** 2 + math.e + 1), abs=1e-6)
    # suppressing token 0 moves the draw to 1; its log-prob is still over the full vocabulary
    token, logp = sample_next(logits, Sampling(greedy=True), suppress=torch.tensor([0]))
    assert token.tolist() == [1]
    assert logp.item() == pytest.approx(1.0 - math.log(math.e ** 2 + math.e + 1), abs=1e-6)
    # temperature 2, top-p 0.6: only token 0 (p = 0.506 at T=2) may be drawn
    torch.manual_seed(0)
    tokens, logps = sample_next(logits.expand(200, 3), Sampling(temperature=2.0, top_p=0.5))
    assert set(tokens.tolist()) == {0}
    expected = 1.0 - math.log(math.e + math.e ** 0.5 + 1)
    torch.testing.assert_close(logps, torch.full((200,), expected), atol=1e-6, rtol=0)
    tokens, _ = sample_next(logits.expand(2000, 3), Sampling(temperature=1.0))
    freq = torch.bincount(tokens, minlength=3).float() / 2000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.04, rtol=0)


def _hf_greedy(model, processor, batch, repeats, max_new_tokens):
    """Plain HF ``generate`` on every repeated prompt (no shared prefill), greedy."""
    inputs = repeat_prompts(batch, repeats)
    stops = stop_token_ids(processor)
    pad = processor.tokenizer.pad_token_id
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=stops, pad_token_id=pad,
                         suppress_tokens=media_token_ids(processor))
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("cache", ["dynamic", "static-eager"])
def test_shared_prefill_greedy_equals_plain_generate(perturbed_policy, synthetic_data, cache,
                                                      monkeypatch):
    model, processor = perturbed_policy
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["test"][:3], store)
    if cache == "static-eager":  # the static cache path without compilation (compiled: below)
        monkeypatch.setattr(decoding, "_decoders", decoding.weakref.WeakKeyDictionary())
        decoding._decoders[model] = {"static": decoding.Decoder(model, "static", compile_mode=None)}
        cache = "static"
    ours = generate(model, processor, batch, num_samples=2, max_new_tokens=10, greedy=True,
                    cache=cache, bucket=64)
    reference = _hf_greedy(model, processor, batch, 2, 10)
    assert torch.equal(ours.response_ids, reference)
    assert all(len(set(row)) > 3 for row in ours.response_ids.tolist()), "degenerate text"
    if cache == "static":  # 3 prompts ran as a bucket of 4 rows; the copy is dropped
        assert ours.prompt_ids.shape[1] % 64 == 0 and ours.prompt_ids.shape[0] == 6
    with torch.no_grad():  # the extra left padding changes nothing in the scoring forward
        logp, _ = token_logprobs(model, ours.model_inputs(), ours.response_ids)
    torch.testing.assert_close(logp * ours.response_mask, ours.logprobs, atol=5e-5, rtol=0)


def test_sampling_log_probs_equal_the_scoring_forward(perturbed_policy, synthetic_data):
    model, processor = perturbed_policy
    _, store, records = synthetic_data
    # prompts of different lengths: left padding shifts slots but not rotary positions
    recs = [records["rl"][0], records["test"][1]]
    batch = encode_prompts(processor, recs, store)
    torch.manual_seed(0)
    out = generate(model, processor, batch, num_samples=4, max_new_tokens=16, temperature=0.7,
                   top_p=0.9)
    assert out.response_ids.shape[0] == 8 and len(set(out.texts)) > 4  # samples differ
    with torch.no_grad():
        logp, _ = token_logprobs(model, out.model_inputs(), out.response_ids, 0.7)
    torch.testing.assert_close(logp * out.response_mask, out.logprobs, atol=5e-5, rtol=0)


def test_compiled_static_decoding_sees_updated_weights(perturbed_policy, synthetic_data,
                                                       monkeypatch):
    """Compiled once (inductor on CPU, CUDA graphs on CUDA); after an in-place "optimizer step"
    the replayed step uses the new weights and nothing recompiles."""
    model, processor = perturbed_policy
    model = copy.deepcopy(model)
    if torch.cuda.is_available():
        model = model.cuda()
    monkeypatch.setattr(decoding, "_decoders", decoding.weakref.WeakKeyDictionary())
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["test"][:2], store)
    run = lambda cache: generate(model, processor, batch, num_samples=2,  # noqa: E731
                                 max_new_tokens=8, greedy=True, cache=cache)
    assert torch.equal(run("static").response_ids, run("dynamic").response_ids)
    assert decoding._decoders[model]["static"].compiled
    frames = dict(torch._dynamo.utils.counters["frames"])
    with torch.no_grad():  # an "optimizer step" that changes the greedy answer
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    after, reference = run("static"), run("dynamic")
    assert torch.equal(after.response_ids, reference.response_ids)
    assert dict(torch._dynamo.utils.counters["frames"]) == frames, "recompiled"


def test_failed_compilation_falls_back_to_the_dynamic_cache(perturbed_policy, synthetic_data,
                                                            monkeypatch, capsys):
    model, processor = perturbed_policy
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["test"][:2], store)

    class Unavailable(torch._dynamo.exc.TorchDynamoException):
        pass

    def broken(*args, **kwargs):
        raise Unavailable("no compiler for this device")

    decoder = decoding.Decoder(model, "static", compile_mode=None)
    decoder.compiled, decoder._step_fn = True, broken
    monkeypatch.setattr(decoding, "_decoders", decoding.weakref.WeakKeyDictionary({model: {"static": decoder}}))
    monkeypatch.setattr(rollout, "_compile_failed", [])
    out = generate(model, processor, batch, max_new_tokens=6, greedy=True, cache="static")
    assert "falling back to the dynamic KV cache" in capsys.readouterr().out
    plain = generate(model, processor, batch, max_new_tokens=6, greedy=True, cache="dynamic")
    assert torch.equal(out.response_ids, plain.response_ids)
    assert resolve_cache("static", torch.device("cpu")) == "dynamic"  # for the rest of the run


def test_the_decoder_registry_does_not_keep_models_alive(tiny_policy, synthetic_data):
    import gc
    import weakref

    model, processor = tiny_policy
    model = copy.deepcopy(model)
    _, store, records = synthetic_data
    generate(model, processor, encode_prompts(processor, records["test"][:1], store),
             max_new_tokens=2, greedy=True)
    assert model in decoding._decoders
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_checking_for_stops_every_few_steps_only_appends_padding(perturbed_policy, synthetic_data,
                                                                 monkeypatch):
    """On CUDA the loop reads "all rows stopped?" every 8 steps: the extra steps emit padding
    after every row's stop token, and the rollout is otherwise identical."""
    model, processor = perturbed_policy
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["test"][:2], store)
    stops, pad = stop_token_ids(processor), processor.tokenizer.pad_token_id
    stop_now = lambda logits, sampling, suppress=None: (  # noqa: E731
        torch.full((logits.shape[0],), stops[0]), torch.zeros(logits.shape[0]))
    out = {}
    for every in (1, 4):
        decoder = decoding.Decoder(model, "dynamic")
        decoder.stop_check_every = every
        monkeypatch.setattr(decoding, "sample_next", stop_now)  # every row stops at once
        tokens, _ = decoder.sample(batch, num_samples=2, max_new_tokens=10,
                                   sampling=Sampling(greedy=True), stop_ids=stops, pad_id=pad)
        out[every] = tokens
    assert out[1].shape == (4, 1) and out[4].shape == (4, 4)
    assert torch.equal(out[4][:, :1], out[1]) and (out[4][:, 1:] == pad).all()
