"""SFT loop and shared training utilities, on the tiny checkpoint and a few synthetic videos."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from appo.config import SFTConfig, load_section
from appo.data.prompts import target_text
from appo.models.loading import load_policy
from appo.tracking import read_metrics
from appo.train import common, sft


@pytest.fixture(autouse=True)
def _no_mlflow(monkeypatch):
    monkeypatch.setenv("APPO_MLFLOW", "0")


def _cfg(out_dir, **overrides) -> SFTConfig:
    knobs = dict(out_dir=str(out_dir), batch_size=4, max_steps=4, warmup_steps=1, lr=3e-3,
                 save_every=0, seed=0, freeze_vision=True)
    knobs.update(overrides)
    return SFTConfig(**knobs)


def _train(cfg, synthetic_data, checkpoint, n=None):
    _, store, records = synthetic_data
    return sft.train(cfg, records["sft"][:n], store, checkpoint, seed=0, device="cpu",
                     progress=False)


def _logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _steps(out_dir):
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, synthetic_data, tiny_checkpoint):
    """20 steps on one fixed batch of 4 questions (full fine-tuning, vision frozen)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPO_MLFLOW", "0")
        out = tmp_path_factory.mktemp("overfit")
        cfg = _cfg(out, max_steps=20, warmup_steps=2)
        return _train(cfg, synthetic_data, tiny_checkpoint, n=4)


def test_loss_mask_covers_exactly_the_target_tokens(tiny_policy, synthetic_data):
    model, processor = tiny_policy
    _, store, records = synthetic_data
    recs = records["sft"][:3]
    batch = sft.make_batch(processor, recs, store)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    for i, qa in enumerate(recs):
        target = labels[i] != -100
        n = int(target.sum())
        assert n > 0 and bool(target[-n:].all()), "targets must be the row's last tokens"
        assert torch.equal(labels[i][target], ids[i][target])
        assert processor.tokenizer.decode(ids[i][target]) == target_text(qa) + "<|im_end|>"
        assert bool((labels[i][mask[i] == 0] == -100).all())
    # token types stay aligned with the re-padded ids: video exactly at video tokens, targets text
    types = batch["mm_token_type_ids"]
    assert types.shape == ids.shape
    assert torch.equal(types != 0, ids == model.config.video_token_id)
    loss_sum, count = sft.compute_loss(model, batch)
    assert count == sft.count_targets(labels) == int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        reference = model(**batch, use_cache=False).loss  # HF's own shifted, masked mean
    assert torch.allclose(loss_sum.detach() / count, reference, atol=1e-5)


def test_a_few_steps_overfit_a_fixed_batch(overfit):
    rows = _steps(overfit.out_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    metrics = json.loads((overfit.out_dir / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["skipped_steps"] == 0
    assert metrics["final_loss"] < rows[0]["loss"] and metrics["train_time_s"] > 0


def test_output_checkpoint_loads_with_the_same_logits(overfit, tiny_policy, synthetic_data):
    _, store, records = synthetic_data
    loaded, processor = load_policy(overfit.out_dir / "model", dtype="float32", device="cpu")
    assert (overfit.out_dir / "model" / "tokenizer.json").is_file()
    batch = sft.make_batch(processor, records["sft"][4:7], store)
    assert torch.allclose(_logits(loaded, batch), _logits(overfit.model, batch), atol=1e-5)
    init, _ = tiny_policy
    trained = dict(loaded.named_parameters())
    vision = [k for k, _ in init.named_parameters() if ".visual." in f".{k}"]
    assert vision and all(torch.equal(init.get_parameter(k), trained[k]) for k in vision)
    assert not torch.equal(init.lm_head.weight, loaded.lm_head.weight)  # language model trained


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-dropout"])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(
        lora, tmp_path, synthetic_data, tiny_checkpoint, monkeypatch):
    # 6 questions, micro-batches of 1, 2 per step: the kill lands mid-epoch 0 after the step-2
    # checkpoint (data position 4), and the resumed run crosses into epoch 1.
    knobs = dict(batch_size=1, grad_accum=2, max_steps=5, save_every=2, keep_checkpoints=2,
                 warmup_steps=2, lora=lora, lora_r=4, lora_dropout=0.2 if lora else 0.0,
                 lr=1e-2 if lora else 3e-3)
    whole = _train(_cfg(tmp_path / "a", **knobs), synthetic_data, tiny_checkpoint, n=6)

    calls = {"n": 0}
    real = sft.compute_loss

    def crash_in_step_4(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # the second micro-batch of step 4
            raise KeyboardInterrupt("simulated kill")
        return real(model, batch)

    monkeypatch.setattr(sft, "compute_loss", crash_in_step_4)
    cfg = _cfg(tmp_path / "b", **knobs)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, synthetic_data, tiny_checkpoint, n=6)
    assert [s for s, _ in common.list_checkpoints(tmp_path / "b" / "checkpoints")] == [2]
    monkeypatch.setattr(sft, "compute_loss", real)
    resumed = _train(cfg, synthetic_data, tiny_checkpoint, n=6)

    assert resumed.metrics["resumed_from_step"] == 2
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert [r["step"] for r in _steps(tmp_path / "b")] == list(range(1, 6))
    assert [r["loss"] for r in _steps(tmp_path / "b")] == [r["loss"] for r in _steps(tmp_path / "a")]
    assert [s for s, _ in common.list_checkpoints(tmp_path / "b" / "checkpoints")] == [4, 5]
    if not lora:  # a changed configuration must not silently resume someone else's run
        with pytest.raises(RuntimeError, match="different SFT configuration"):
            _train(_cfg(tmp_path / "b", **{**knobs, "lr": 1e-3}), synthetic_data, tiny_checkpoint,
                   n=6)


def test_lora_run_exports_a_merged_plain_checkpoint(tmp_path, synthetic_data, tiny_checkpoint,
                                                     tiny_policy):
    from safetensors import safe_open

    cfg = _cfg(tmp_path, lora=True, lora_r=4, lora_alpha=8, max_steps=2, lr=2e-2, batch_size=2)
    result = _train(cfg, synthetic_data, tiny_checkpoint, n=4)
    model_dir = tmp_path / "model"
    assert not (model_dir / "adapter_config.json").exists()
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    loaded, processor = load_policy(model_dir, dtype="float32", device="cpu")
    _, store, records = synthetic_data
    batch = sft.make_batch(processor, records["sft"][:2], store)
    assert torch.allclose(_logits(loaded, batch), _logits(result.model, batch), atol=1e-5)
    init = dict(tiny_policy[0].named_parameters())
    trained = dict(loaded.named_parameters())
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(init[q], trained[q]), "LoRA delta was not merged"
    embed = "model.language_model.embed_tokens.weight"
    assert torch.equal(init[embed], trained[embed])  # not a LoRA target
    vision = [k for k in init if ".visual." in f".{k}"]
    assert vision and all(torch.equal(init[k], trained[k]) for k in vision)
    assert result.metrics["trainable_params"] < result.metrics["total_params"] // 10


def test_nonfinite_loss_steps_are_skipped_and_counted(tmp_path, synthetic_data, tiny_checkpoint,
                                                      tiny_policy, monkeypatch):
    real = sft.compute_loss
    calls = {"n": 0}

    def nan_on_step_2(model, batch):
        calls["n"] += 1
        loss, count = real(model, batch)
        return (loss * float("nan") if calls["n"] == 2 else loss), count

    monkeypatch.setattr(sft, "compute_loss", nan_on_step_2)
    _train(_cfg(tmp_path / "one", max_steps=3, batch_size=2), synthetic_data, tiny_checkpoint, n=2)
    rows = _steps(tmp_path / "one")
    assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0]
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["skipped_steps"] == 1

    def always_nan(model, batch):
        loss, count = real(model, batch)
        return loss * float("nan"), count

    monkeypatch.setattr(sft, "compute_loss", always_nan)
    result = _train(_cfg(tmp_path / "all", max_steps=2, weight_decay=0.1, batch_size=2),
                    synthetic_data, tiny_checkpoint, n=2)
    assert result.metrics["skipped_steps"] == 2
    init = dict(tiny_policy[0].named_parameters())
    assert all(torch.equal(init[k], p) for k, p in result.model.named_parameters()), \
        "a skipped step must not move the weights"
    with pytest.raises(RuntimeError, match=r"step 3: 3 non-finite steps in a row"):
        _train(_cfg(tmp_path / "bad", max_steps=5, max_bad_steps=2, batch_size=2),
               synthetic_data, tiny_checkpoint, n=2)


def test_lr_schedule_by_hand():
    # warmup 4, 13 steps, min ratio 0.1: (i+1)/4 for i < 4, then cosine over steps 4..12.
    f = [common.lr_factor(i, 4, 13, 0.1) for i in range(13)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0  # peak right after warmup
    assert f[8] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f[12] == pytest.approx(0.1)  # the last step ends at lr * min_lr_ratio
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert common.lr_factor(0, 0, 10) == 1.0 and common.lr_factor(0, 0, 1) == 1.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2.0)
    sched = common.build_scheduler(opt, warmup_steps=4, total_steps=13, min_lr_ratio=0.1)
    seen = []
    for _ in range(13):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * x for x in f])


def test_optimizer_groups_and_gradient_clipping():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = common.build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=[0.8, 0.9])
    decays = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 3), (0.1, 1)] and opt.defaults["betas"] == (0.8, 0.9)
    w = model[0].weight
    w.grad = torch.full_like(w, 2.0)  # norm 6
    assert common.clip_gradients(model.parameters(), 3.0) == pytest.approx(6.0)
    assert w.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    w.grad[0, 0] = float("inf")
    assert not math.isfinite(common.clip_gradients(model.parameters(), 1.0))
    counter = common.SkipCounter(max_consecutive=1)
    counter.update(False, 1)
    counter.update(True, 2)
    counter.update(False, 3)
    with pytest.raises(RuntimeError, match="step 4"):
        counter.update(False, 4)
    assert counter.total == 3


def test_rng_state_round_trips_through_a_file(tmp_path):
    common.seed_everything(3)
    state = common.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))
    common.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_data_order_and_step_count():
    a = sft.batch_order(10, 4, seed=1, epoch=0)
    assert [len(b) for b in a] == [4, 4, 2] and sorted(np.concatenate(a)) == list(range(10))
    assert all(np.array_equal(x, y) for x, y in zip(a, sft.batch_order(10, 4, 1, 0)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(sft.batch_order(10, 4, 1, 1)))
    assert sft.total_steps(SFTConfig(epochs=3, batch_size=16), 512) == 96
    assert sft.total_steps(SFTConfig(epochs=3, batch_size=16, grad_accum=4), 512) == 24
    assert sft.total_steps(SFTConfig(max_steps=7), 512) == 7


def test_stage_entry_point_reads_params(tmp_path, synthetic_data, tiny_checkpoint, monkeypatch):
    from appo.stages import sft as stage

    data_dir, store, _ = synthetic_data
    params = tmp_path / "params.yaml"
    params.write_text(
        f"seed: 0\ndata: {{out_dir: {data_dir}}}\nframes: {{out_dir: {store.dir}}}\n"
        f"model: {{out_dir: {tiny_checkpoint}, device: cpu}}\n"
        f"sft: {{out_dir: {tmp_path / 'out'}, max_steps: 2, batch_size: 2, save_every: 0}}\n")
    stage.main(["--params", str(params)])
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 2
    load_section(SFTConfig, "sft", "params.yaml")  # the repository's params are valid


def test_freeze_vision_auto_trains_only_the_embedded_tiny_tower(tiny_checkpoint):
    """auto: the embedded tiny model (random tower) trains its vision tower, a real one does not."""
    model, _ = load_policy(tiny_checkpoint, dtype="float32", device="cpu")
    assert model.config.appo_embedded_tiny is True
    auto = SFTConfig(freeze_vision="auto")
    assert sft.freeze_vision(auto, model) is False
    model.config.appo_embedded_tiny = False  # what a pretrained Qwen2.5-VL looks like
    assert sft.freeze_vision(auto, model) is True
    for explicit in (True, False):
        assert sft.freeze_vision(SFTConfig(freeze_vision=explicit), model) is explicit
    trainable = common.prepare_for_training(model, freeze_vision=sft.freeze_vision(auto, model))
    assert not any(p.requires_grad for p in common._vision_module(trainable).parameters())


def test_progress_bar_redraws_at_its_interval_not_every_step(tmp_path, synthetic_data,
                                                             tiny_checkpoint, capfd, monkeypatch):
    """Under a pipe (Prefect, CI logs) every redraw becomes a log line: the loss postfix must
    not force one per step, so a long interval leaves only the first and the closing draw."""
    import functools

    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", functools.partial(tqdm.tqdm, mininterval=1000))
    _, store, records = synthetic_data
    sft.train(_cfg(tmp_path, max_steps=6), records["sft"][:4], store, tiny_checkpoint, seed=0,
              device="cpu", progress=True)
    draws = [d for d in capfd.readouterr().err.replace("\r", "\n").splitlines()
             if d.startswith("sft:")]
    assert 1 <= len(draws) <= 3, draws
