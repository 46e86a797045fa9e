import dataclasses

import pytest
import torch

from appo.data.collate import encode_prompts
from appo.engine.frame_attention import (
    FrameAttentionRecorder,
    decoder_layers,
    frame_attention,
    frame_index_of_tokens,
    recompose_mrope,
)

N_RESPONSE = 5


class _FewerFrames:
    """A FrameStore view that keeps only the first ``keep`` frames of one video."""

    def __init__(self, store, video, keep):
        self.store, self.video, self.keep = store, video, keep

    def get(self, video):
        cached = self.store.get(video)
        if video != self.video:
            return cached
        return dataclasses.replace(cached, frames=cached.frames[: self.keep],
                                   indices=cached.indices[: self.keep])


@pytest.fixture(scope="module")
def eager_model(tiny_checkpoint):
    from appo.models.loading import load_policy

    model, _ = load_policy(tiny_checkpoint, dtype="float32", device="cpu",
                           attn_implementation="eager")
    return model


@pytest.fixture(scope="module")
def batch(tiny_policy, synthetic_data):
    """Left-padded prompts of different lengths and frame counts + random responses.

    Row 1 has half the frames (T = 2 vs 4); row 2's response is right-padded after 3 tokens.
    """
    model, processor = tiny_policy
    _, store, records = synthetic_data
    qas = sorted(records["rl"], key=lambda qa: len(qa.problem))
    qas = [qas[0], qas[-1], qas[len(qas) // 2]]
    prompts = encode_prompts(processor, qas, _FewerFrames(store, qas[1].video, 4))
    lengths = prompts["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3, "prompts must have different lengths"
    assert prompts["video_grid_thw"][:, 0].tolist() == [4, 2, 4]
    g = torch.Generator().manual_seed(0)
    B, P = prompts["input_ids"].shape
    response = torch.randint(20, 300, (B, N_RESPONSE), generator=g)
    assert not (response == model.config.video_token_id).any()
    mask = torch.ones(B, N_RESPONSE, dtype=prompts["attention_mask"].dtype)
    mask[2, 3:] = 0
    response[2, 3:] = processor.tokenizer.pad_token_id
    inputs = dict(prompts)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], response], 1)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], mask], 1)
    types = prompts["mm_token_type_ids"]  # response tokens are text
    inputs["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(response, dtype=types.dtype)], 1)
    return inputs, P


def _reference(eager_model, inputs, P, layers):
    """a[b, n, t] from eager attention probabilities, by hand."""
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True, use_cache=False)
    attentions = out.attentions
    assert len(attentions) == len(decoder_layers(eager_model))
    config = eager_model.config
    frame_of = frame_index_of_tokens(inputs["input_ids"], inputs["video_grid_thw"],
                                     config.video_token_id, config.vision_config.spatial_merge_size)
    B = inputs["input_ids"].shape[0]
    T = int(frame_of.max()) + 1
    ref = torch.zeros(B, N_RESPONSE, T, dtype=torch.float64)
    for b in range(B):
        for n in range(N_RESPONSE):
            q = P + n - 1
            if not inputs["attention_mask"][b, q]:
                continue
            for t in range(T):
                keys = (frame_of[b] == t).nonzero().squeeze(1)
                if len(keys) == 0:
                    continue
                vals = [attentions[layer][b, :, q, keys].double().mean() for layer in layers]
                ref[b, n, t] = torch.stack(vals).mean()
    return ref


@pytest.mark.parametrize("layers", [(-1, -2, -3), (0,)])
def test_matches_eager_attention(tiny_policy, eager_model, batch, layers):
    model, _ = tiny_policy
    assert model.config._attn_implementation == "sdpa"
    inputs, P = batch
    ref = _reference(eager_model, inputs, P, layers)
    attn, frame_valid = frame_attention(model, inputs, P, N_RESPONSE, layers=layers)
    assert attn.shape == (3, N_RESPONSE, 4) and attn.dtype == torch.float32
    assert frame_valid.tolist() == [[True] * 4, [True, True, False, False], [True] * 4]
    assert (attn[1, :, 2:] == 0).all()  # frames beyond row 1's T
    assert (attn[2, 4:] == 0).all()  # query position beyond the row's attention_mask
    assert (attn[2, 3] > 0).all()  # the last valid position still attends (predicts a pad)
    assert torch.allclose(attn.double(), ref, atol=1e-5, rtol=0)
    assert ref.abs().max() > 1e-3  # the comparison is not vacuous


def test_frame_index_of_tokens_hand_made():
    V = 9
    ids = torch.tensor([
        [0, 0, 5, V, V, V, V, 6, 1, 2],  # left padded; 4 frames of 1 token (2x2 grid, merge 2)
        [5, V, V, V, V, V, V, V, V, 6],  # 2 frames of 4 tokens (4x4 grid, merge 2)
    ])
    grid = torch.tensor([[4, 2, 2], [2, 4, 4]])
    out = frame_index_of_tokens(ids, grid, video_token_id=V, merge_size=2)
    assert out.tolist() == [
        [-1, -1, -1, 0, 1, 2, 3, -1, -1, -1],
        [-1, 0, 0, 0, 0, 1, 1, 1, 1, -1],
    ]
    with pytest.raises(ValueError, match="exactly one video"):
        frame_index_of_tokens(ids, torch.tensor([[2, 2, 2], [2, 4, 4]]), V, 2)
    with pytest.raises(ValueError, match="no video tokens"):
        frame_index_of_tokens(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 2]]), V, 2)
    with pytest.raises(ValueError, match="video_grid_thw has 3 rows"):
        frame_index_of_tokens(ids, torch.tensor([[4, 2, 2], [2, 4, 4], [1, 2, 2]]), V, 2)


def test_hooks_removed_and_logits_unchanged(tiny_policy, batch):
    model, _ = tiny_policy
    inputs, P = batch
    attn_modules = [layer.self_attn for layer in decoder_layers(model)]
    before = [len(m._forward_pre_hooks) for m in attn_modules]
    with torch.no_grad():
        plain = model(**inputs).logits
        recorder = FrameAttentionRecorder(model)
        with recorder:
            unprepared = model(**inputs).logits  # hooks idle until prepare()
            recorder.prepare(inputs["input_ids"], inputs["attention_mask"],
                             inputs["video_grid_thw"], P, N_RESPONSE)
            assert [len(m._forward_pre_hooks) for m in attn_modules[-3:]] == [
                b + 1 for b in before[-3:]]
            hooked = model(**inputs).logits
    assert [len(m._forward_pre_hooks) for m in attn_modules] == before
    assert torch.equal(plain, hooked) and torch.equal(plain, unprepared)
    attn, _ = recorder.result()
    assert attn.abs().sum() > 0
    with pytest.raises(RuntimeError, match="prepare"):
        FrameAttentionRecorder(model).result()


def test_query_chunking_invariance(tiny_policy, batch):
    model, _ = tiny_policy
    inputs, P = batch
    small, _ = frame_attention(model, inputs, P, N_RESPONSE, query_chunk=2)
    large, _ = frame_attention(model, inputs, P, N_RESPONSE, query_chunk=128)
    assert torch.allclose(small, large, atol=1e-7, rtol=0)


def test_old_style_mrope_axes_recompose_like_the_model(tiny_policy):
    """(3, B, S, D) cos/sin of older transformers give the model's (B, S, D) embedding."""
    model, _ = tiny_policy
    rotary = model.model.language_model.rotary_emb
    section = decoder_layers(model)[0].self_attn.config.rope_parameters["mrope_section"]
    position_ids = torch.randint(0, 50, (3, 2, 7))
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, position_ids)
    freqs = position_ids[..., None].float() * rotary.inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    assert torch.allclose(recompose_mrope(emb.cos(), section), cos, atol=1e-6)
    assert torch.allclose(recompose_mrope(emb.sin(), section), sin, atol=1e-6)


def test_bad_layers_and_response_window(tiny_policy, batch):
    model, _ = tiny_policy
    inputs, P = batch
    with pytest.raises(ValueError, match="out of range"):
        FrameAttentionRecorder(model, layers=(99,))
    recorder = FrameAttentionRecorder(model, layers=(-1, 3))  # same layer twice -> once
    assert recorder.layers == [3]
    with pytest.raises(ValueError, match="does not fit"):
        recorder.prepare(inputs["input_ids"], inputs["attention_mask"], inputs["video_grid_thw"],
                         P, N_RESPONSE + 1)
