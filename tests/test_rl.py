"""RL engine on the tiny model: rollout log-probs, batching, end-to-end steps, learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from appo.config import AlgorithmConfig, PerceptionConfig, RLConfig, TemporalConfig
from appo.data.collate import encode_prompts
from appo.engine.rollout import (
    concat_rollouts,
    generate,
    repeat_prompts,
    response_mask_from_ids,
    token_logprobs,
)
from appo.rl.batch import PromptSampler
from appo.rl.trainer import RLTrainer

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
        loss, stats = trainer.micro_batch_loss(batch, rows)
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


def test_attention_and_weight_controls_in_the_trainer(fresh_policy, synthetic_data, monkeypatch):
    """attention: random captures nothing and draws scores seeded by (seed, step, group), zero
    at padding and the same whatever the micro-batching; weights: uniform puts the group's mean
    weight on every valid token."""
    import dataclasses

    import appo.engine.frame_attention as frame_attention

    model, processor = fresh_policy
    _, store, records = synthetic_data
    cfg = RLConfig(prompts_per_step=2, num_generations=4, max_new_tokens=10,
                   groups_per_micro_batch=1)

    def control(**knobs):
        return dataclasses.replace(APPO, perception=dataclasses.replace(APPO.perception, **knobs))

    torch.manual_seed(0)
    batch = RLTrainer(model, processor, cfg, APPO, records["rl"], store,
                      reward_fn=_digit_reward).collect()
    rows = torch.arange(batch.rollout.prompt_ids.shape[0])
    mask = batch.rollout.response_mask.bool()
    grid = batch.rollout.model_inputs()["video_grid_thw"][:, 0]  # temporal patches per row
    trainer = RLTrainer(model, processor, cfg, control(attention="random"), records["rl"], store)
    random = trainer.weighter.random_attention  # (mask, frames, global group indices, step)
    attn, frame_valid = random(mask, grid, [0, 1], 0)
    assert attn.shape == (8, mask.shape[1], frame_valid.shape[1]) and frame_valid.all()
    assert torch.equal(attn, random(mask, grid, [0, 1], 0)[0])
    assert (attn[~mask] == 0).all() and (attn[mask] > 0).all()
    assert torch.equal(random(mask[4:], grid[4:], [1], 0)[0], attn[4:])
    assert not torch.equal(attn[:4], attn[4:])
    assert not torch.equal(random(mask, grid, [0, 1], 1)[0], attn)
    with monkeypatch.context() as m:
        m.setattr(frame_attention, "FrameAttentionRecorder", None)  # no capture
        loss, stats = trainer.micro_batch_loss(batch, rows[:4])
    assert torch.isfinite(loss) and stats["appo/num_crucial_frames"] >= 1

    uniform = RLTrainer(model, processor, cfg, control(weights="uniform"), records["rl"], store)
    _, stats = uniform.micro_batch_loss(batch, rows[:4])
    w = uniform.weighter.cached(0)[mask[:4]]
    assert torch.equal(w, w[:1].expand_as(w)) and float(w[0]) >= 1.0
    assert stats["appo/weight_max"] == stats["appo/weight_mean"] == pytest.approx(float(w[0]))


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


def _ragged_batch(model, processor, store, records, cfg):
    """A collected batch of 3 groups (G = 2) whose responses have very different lengths."""
    torch.manual_seed(0)
    batch = RLTrainer(model, processor, cfg, AlgorithmConfig(beta=0.0), records["rl"], store,
                      reward_fn=_digit_reward).collect()
    n = batch.rollout.response_ids.shape[1]
    lengths = torch.tensor([1, 2, n, n - 1, 3, n])
    batch.rollout.response_mask = batch.rollout.response_mask * (
        torch.arange(n)[None, :] < lengths[:, None])
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.0, 1.0])
    batch.correct = torch.tensor([True, False, True, False, False, True])
    return batch


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "appo"])
def test_micro_batching_does_not_change_the_update(fresh_policy, synthetic_data, agg):
    """The step's loss is one aggregate over the batch: micro-batches of 1 group each (1 + 3,
    n + n-1, 3 + n valid tokens) give the gradients and SGD update of 1 micro-batch of all 3
    groups. Token-mean used to average per micro-batch and weight by row share, which puts
    ~3x more weight on each token of the short group."""
    import dataclasses

    model, processor = fresh_policy
    _, store, records = synthetic_data
    algo = (APPO if agg == "appo" else
            AlgorithmConfig(agg_mode=agg, beta=0.0, clip_high=0.28))
    base = RLConfig(prompts_per_step=3, num_generations=2, max_new_tokens=8, lr=1.0,
                    max_grad_norm=1e9)
    batch = _ragged_batch(model, processor, store, records, base)
    lengths = batch.rollout.lengths.view(3, 2).sum(1)
    assert len(set(lengths.tolist())) == 3, lengths  # the groups differ in token counts
    results = []
    for groups in (1, 3):
        policy = copy.deepcopy(model)
        cfg = dataclasses.replace(base, groups_per_micro_batch=groups)
        params = [p for p in policy.parameters() if p.requires_grad]
        trainer = RLTrainer(policy, processor, cfg, algo, records["rl"], store,
                            optimizer=torch.optim.SGD(params, lr=cfg.lr))
        assert len(trainer.micro_batches(batch)) == 3 // groups
        metrics = trainer.update(batch)
        results.append((metrics, {n: (p.grad.clone(), p.detach().clone())
                                  for n, p in policy.named_parameters() if p.grad is not None}))
    (m_split, split), (m_one, one) = results
    assert split.keys() == one.keys() and split
    assert any(float(g.abs().max()) > 0 for g, _ in one.values())
    for name in one:
        torch.testing.assert_close(split[name][0], one[name][0], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(split[name][1], one[name][1], rtol=1e-5, atol=1e-7, msg=name)
    assert m_split["loss"] == pytest.approx(m_one["loss"], rel=1e-5, abs=1e-7)
    assert m_split["grad_norm"] == pytest.approx(m_one["grad_norm"], rel=1e-5)


def test_appo_weights_grad_with_several_iterations(micro_params, monkeypatch):
    """mu = 2 with perception.weights_grad: the token weights of pass 1 hang on pass 1's graph,
    which its backward frees; pass 2 recomputes them ("backward through the graph a second
    time" before)."""
    import yaml

    from appo.rl.weighter import PerceptionWeighter
    from appo.stages import rl

    monkeypatch.setenv("APPO_MLFLOW", "0")
    params = micro_params("mu2", steps=2, save_every=0, num_iterations=2)
    body = yaml.safe_load(params.read_text())
    body["rl"]["algorithms"]["appo"]["perception"]["weights_grad"] = True
    body["rl"]["algorithms"]["appo"]["dynamic_sampling"] = False
    params.write_text(yaml.safe_dump(body))
    calls = []
    real = PerceptionWeighter.weights

    def spy(self, *args, **kwargs):
        w, stats = real(self, *args, **kwargs)
        calls.append(w.requires_grad)
        return w, stats

    monkeypatch.setattr(PerceptionWeighter, "weights", spy)
    summary = rl.run(str(params), "appo", progress=False)
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["final_reward"])
    # 2 steps x 2 passes x 2 micro-batches (1 group each), every time with a graph
    assert calls == [True] * 8


def test_trainer_never_picks_a_shorter_videos_padded_frames(fresh_policy, synthetic_data,
                                                            monkeypatch):
    """In a micro-batch of videos with different numbers of temporal patches the recorder pads
    the shorter ones' frames (frame_valid False). The trainer must pass that mask on: here the
    first group's last frame is marked padding and given the largest attention."""
    from appo.engine.frame_attention import FrameAttentionRecorder

    model, processor = fresh_policy
    _, store, records = synthetic_data
    cfg = RLConfig(prompts_per_step=2, num_generations=2, max_new_tokens=8,
                   groups_per_micro_batch=2)
    torch.manual_seed(0)
    batch = RLTrainer(model, processor, cfg, AlgorithmConfig(beta=0.0), records["rl"], store,
                      reward_fn=_digit_reward).collect()
    real = FrameAttentionRecorder.result

    def padded(self):
        attn, frame_valid = real(self)
        frame_valid = frame_valid.clone()
        frame_valid[:2, -1] = False  # group 0's video is one temporal patch shorter
        attn = attn.clone()
        attn[:, :, -1] = 1.0  # larger than any real attention: garbage in group 0 (padding)
        return attn, frame_valid

    monkeypatch.setattr(FrameAttentionRecorder, "result", padded)
    trainer = RLTrainer(model, processor, cfg, APPO, records["rl"], store)
    rows = torch.arange(batch.rollout.prompt_ids.shape[0])
    _, stats = trainer.micro_batch_loss(batch, rows)
    T = batch.rollout.visual["video_grid_thw"][0, 0].item()
    first, second = trainer.weighter.last_crucial_frames
    assert first and T - 1 not in first, first
    assert T - 1 in second  # group 1's last frame is real and the most attended
    assert stats["appo/num_crucial_frames"] >= 1
