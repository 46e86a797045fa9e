"""RL engine on the tiny model: rollout log-probs, batching, end-to-end steps, learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from appo.config import AlgorithmConfig, PerceptionConfig, RLConfig, TemporalConfig
from appo.data.collate import encode_prompts
from appo.rl.rollout import (
    concat_rollouts,
    generate,
    repeat_prompts,
    response_mask_from_ids,
    token_logprobs,
)
from appo.rl.trainer import PromptSampler, RLTrainer

GRPO = AlgorithmConfig()
DAPO = AlgorithmConfig(clip_high=0.28, agg_mode="token-mean", beta=0.0, dynamic_sampling=True,
                       overlong_buffer=8)
APPO = AlgorithmConfig(clip_high=0.28, agg_mode="token-mean", beta=0.0,
                       perception=PerceptionConfig(enabled=True, K=8, k_avg=4))
TGRPO = AlgorithmConfig(temporal=TemporalConfig(enabled=True, length_bonus=0.2, length_min=2,
                                                length_max=10))


@pytest.fixture()
def fresh_policy(tiny_policy):
    model, processor = tiny_policy
    return copy.deepcopy(model), processor


def test_response_mask_stops_after_first_stop_token():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    mask, truncated = response_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_repeat_and_select_keep_each_rows_video(tiny_policy, synthetic_data):
    _, processor = tiny_policy
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["rl"][:2], store)
    rep = repeat_prompts(batch, 3)
    per_video = batch["pixel_values_videos"].shape[0] // 2
    assert rep["pixel_values_videos"].shape[0] == 6 * per_video
    assert rep["video_grid_thw"].shape[0] == 6 and rep["second_per_grid_ts"].shape[0] == 6
    # rows 3..5 are copies of prompt 1: their pixels are prompt 1's pixels
    torch.testing.assert_close(rep["pixel_values_videos"][3 * per_video: 4 * per_video],
                               batch["pixel_values_videos"][per_video:])
    assert torch.equal(rep["input_ids"][4], batch["input_ids"][1])


def test_training_logprobs_match_generation_logprobs(tiny_policy, synthetic_data):
    model, processor = tiny_policy
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["rl"][:2], store)
    torch.manual_seed(0)
    rollout = generate(model, processor, batch, num_samples=3, max_new_tokens=12, temperature=0.7)
    assert rollout.response_ids.shape[0] == 6 and len(rollout.texts) == 6
    assert set(rollout.visual) >= {"pixel_values_videos", "video_grid_thw"}
    with torch.no_grad():
        logp, hidden = token_logprobs(model, rollout.model_inputs(), rollout.response_ids, 0.7)
    mask = rollout.response_mask
    torch.testing.assert_close(logp * mask, rollout.logprobs, atol=1e-5, rtol=0)
    assert hidden.shape[:2] == rollout.response_ids.shape


def test_forwards_use_multimodal_rotary_positions(tiny_policy, synthetic_data):
    """The prompt batch and every rollout carry mm_token_type_ids, so the model builds its (t, h, w)
    rotary positions: video tokens of one frame share a time index, positions then advance slower
    than tokens, and the stored rope delta is negative (1-D text positions would give 0)."""
    model, processor = tiny_policy
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["rl"][:2], store)
    types = batch["mm_token_type_ids"]
    assert torch.equal(types != 0, batch["input_ids"] == model.config.video_token_id)
    model.model.rope_deltas = None
    with torch.no_grad():
        model(**batch)
    assert model.model.rope_deltas is not None and (model.model.rope_deltas < 0).all()

    torch.manual_seed(0)
    parts = [generate(model, processor, encode_prompts(processor, records["rl"][i:i + 1], store),
                      num_samples=2, max_new_tokens=n) for i, n in ((0, 3), (1, 5))]
    inputs = parts[0].model_inputs()
    assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape
    assert (inputs["mm_token_type_ids"][:, parts[0].prompt_ids.shape[1]:] == 0).all()
    joined = concat_rollouts(parts, processor.tokenizer.pad_token_id)
    rows = joined.model_inputs()
    assert rows["mm_token_type_ids"].shape == rows["input_ids"].shape
    # each row's types still mark exactly its video tokens after re-padding and selection
    assert torch.equal(rows["mm_token_type_ids"] != 0, rows["input_ids"] == model.config.video_token_id)
    picked = joined.select(torch.tensor([3])).model_inputs()
    assert torch.equal(picked["mm_token_type_ids"], rows["mm_token_type_ids"][3:4])


def test_prompt_sampler_is_seeded_and_resumable():
    a = PromptSampler(list(range(5)), seed=3)
    first = a.next(7)
    b = PromptSampler(list(range(5)), seed=3)
    b.position = 4
    assert b.next(3) == first[4:]
    assert sorted(first[:5]) == list(range(5))  # each epoch is a permutation


@pytest.mark.parametrize("algo", [GRPO, DAPO, APPO, TGRPO], ids=["grpo", "dapo", "appo", "tgrpo"])
def test_end_to_end_steps_change_weights(fresh_policy, synthetic_data, algo):
    model, processor = fresh_policy
    _, store, records = synthetic_data
    cfg = RLConfig(prompts_per_step=2, num_generations=4, max_new_tokens=12, lr=1e-3,
                   groups_per_micro_batch=1)
    ref = copy.deepcopy(model) if algo.beta > 0 else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RLTrainer(model, processor, cfg, algo, records["rl"], store, ref_model=ref,
                        reward_fn=_digit_reward)
    for _ in range(2):
        metrics = trainer.train_step()
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter moved"
    if algo.perception.enabled:
        assert metrics["appo/weight_max"] <= 1.7 + 1e-6 and metrics["appo/weight_mean"] >= 1.0
        assert metrics["appo/num_crucial_frames"] >= 1
        assert 0.0 <= metrics["appo/perception_hit_rate"] <= 1.0
    if algo.dynamic_sampling:
        assert metrics["groups_sampled"] >= metrics["groups_kept"]
    if algo.temporal.enabled:
        assert "reward/temporal" in metrics and "reward/length" in metrics


def _digit_reward(texts, records):
    """A dense, trivially learnable reward: the share of response characters that are digits."""
    vals = [sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts]
    return {"total": vals, "accuracy": vals}


def test_learning_raises_a_trivial_reward(fresh_policy, synthetic_data):
    model, processor = fresh_policy
    _, store, records = synthetic_data
    torch.manual_seed(0)
    cfg = RLConfig(prompts_per_step=2, num_generations=8, max_new_tokens=16, lr=3e-3,
                   groups_per_micro_batch=2, seed=0)
    trainer = RLTrainer(model, processor, cfg, DAPO, records["rl"], store,
                        reward_fn=_digit_reward)
    rewards = [trainer.train_step()["reward"] for _ in range(24)]
    early, late = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert late > early + 0.15, rewards


def test_rl_stage_resumes_to_the_same_weights(tmp_path, micro_params, monkeypatch):
    from safetensors.torch import load_file

    from appo.rl.trainer import RLTrainer
    from appo.stages import rl

    monkeypatch.setenv("APPO_MLFLOW", "0")
    straight = str(micro_params("a", steps=4, save_every=2))
    rl.run(straight, "grpo", progress=False)

    crashed = str(micro_params("b", steps=4, save_every=2))
    real_step = RLTrainer.train_step

    def dying_step(self):
        if self.steps_done == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    monkeypatch.setattr(RLTrainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        rl.run(crashed, "grpo", progress=False)
    monkeypatch.setattr(RLTrainer, "train_step", real_step)
    assert (tmp_path / "b" / "rl" / "grpo" / "checkpoints" / "step-2").is_dir()
    rl.run(crashed, "grpo", progress=False)

    a = load_file(str(tmp_path / "a" / "rl" / "grpo" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "rl" / "grpo" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [row["step"] for row in _rows(tmp_path / "b" / "rl" / "grpo" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4]  # crashed step 2 was dropped and redone; 4 = final row


def _rows(path):
    import json

    return [json.loads(line) for line in open(path) if line.strip()]


def test_appo_with_unit_weights_is_exactly_dapo(fresh_policy, synthetic_data):
    """w_max = 1 makes every perception weight 1: loss and gradients must equal DAPO's."""
    import dataclasses

    model, processor = fresh_policy
    _, store, records = synthetic_data
    cfg = RLConfig(prompts_per_step=2, num_generations=4, max_new_tokens=10,
                   groups_per_micro_batch=2)
    unit = dataclasses.replace(APPO, perception=dataclasses.replace(APPO.perception, w_max=1.0))
    dapo = dataclasses.replace(APPO, perception=PerceptionConfig(enabled=False))
    torch.manual_seed(0)
    batch = RLTrainer(model, processor, cfg, dapo, records["rl"], store,
                      reward_fn=_digit_reward).collect()
    rows = torch.arange(batch.rollout.prompt_ids.shape[0])
    grads = []
    for algo in (unit, dapo):
        trainer = RLTrainer(model, processor, cfg, algo, records["rl"], store)
        model.zero_grad()
        loss, stats = trainer._loss(batch, rows, {})
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                      if p.grad is not None]))
        if algo is unit:
            assert stats["appo/weight_max"] == 1.0 and stats["appo/num_crucial_frames"] >= 1
    (l_unit, g_unit), (l_dapo, g_dapo) = grads
    assert torch.equal(l_unit, l_dapo)
    assert len(g_unit) == len(g_dapo) > 0
    assert any(g.abs().sum() > 0 for g in g_dapo), "degenerate batch: zero gradient"
    for a, b in zip(g_unit, g_dapo):
        assert torch.equal(a, b)


def test_shuffled_frames_for_the_temporal_contrast(tiny_policy, synthetic_data):
    _, processor = tiny_policy
    _, store, records = synthetic_data
    plain = encode_prompts(processor, records["rl"][:2], store)
    a = encode_prompts(processor, records["rl"][:2], store, shuffle_seed=5)
    b = encode_prompts(processor, records["rl"][:2], store, shuffle_seed=5)
    assert torch.equal(a["input_ids"], plain["input_ids"])  # same prompt, same token count
    assert a["pixel_values_videos"].shape == plain["pixel_values_videos"].shape
    assert not torch.equal(a["pixel_values_videos"], plain["pixel_values_videos"])
    assert torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])  # seeded


def test_lora_policy_uses_its_base_as_the_kl_reference(fresh_policy, synthetic_data):
    from appo.train.common import prepare_for_training

    model, processor = fresh_policy
    _, store, records = synthetic_data
    model = prepare_for_training(model, lora=dict(r=4, alpha=8))
    cfg = RLConfig(prompts_per_step=2, num_generations=2, max_new_tokens=8, lr=1e-2,
                   groups_per_micro_batch=1)
    trainer = RLTrainer(model, processor, cfg, GRPO, records["rl"], store,
                        reward_fn=_digit_reward)  # beta 0.04, no reference copy
    first = trainer.train_step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # adapters start at zero: policy == base
    for _ in range(2):
        last = trainer.train_step()
    assert last["kl"] > 0  # the adapters moved away from the base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rl_stage_on_cuda_trains_under_bf16_autocast(micro_params, monkeypatch):
    """model.device cuda + rl.mixed_precision auto: accelerate places the policy on the GPU and
    runs its forward in bf16 autocast; APPO's capture and weights work there too."""
    import yaml

    from appo.stages import rl
    from appo.train import common

    monkeypatch.setenv("APPO_MLFLOW", "0")
    params = micro_params("gpu", steps=2, save_every=0)
    body = yaml.safe_load(params.read_text())
    body["model"]["device"] = "cuda"
    params.write_text(yaml.safe_dump(body))
    seen = []
    real = common.make_accelerator

    def spy(*args, **kwargs):
        acc = real(*args, **kwargs)
        seen.append((acc.device.type, acc.mixed_precision))
        return acc

    monkeypatch.setattr(common, "make_accelerator", spy)
    summary = rl.run(str(params), "appo", progress=False)
    assert seen == [("cuda", "bf16")]
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["final_reward"])
