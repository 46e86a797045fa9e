import pytest
import torch

from appo.data.collate import encode_prompts
from appo.models.loading import ModelError, check_checkpoint, load_policy
from appo.models.tiny import SPECIAL_TOKENS, TAG_TOKENS


def test_tokenizer_round_trip_keeps_special_tokens(tiny_policy):
    _, processor = tiny_policy
    tok = processor.tokenizer
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What colour?<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for special in SPECIAL_TOKENS + TAG_TOKENS:
        (single,) = tok(special, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(single) == special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_save_load_gives_identical_logits(tiny_checkpoint, tiny_policy, tmp_path):
    from appo.models.loading import save_checkpoint

    model, processor = tiny_policy
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    save_checkpoint(model, processor, tmp_path / "copy")
    reloaded, _ = load_policy(tmp_path / "copy", dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_processor_turns_cached_frames_into_video_tokens(tiny_policy, synthetic_data):
    model, processor = tiny_policy
    _, store, records = synthetic_data
    batch = encode_prompts(processor, records["rl"][:3], store)
    # 8 frames of 56x56: temporal patches 8/2 = 4, spatial grid 56/14 = 4 x 4
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4]] * 3
    assert batch["pixel_values_videos"].shape == (3 * 4 * 4 * 4, 3 * 2 * 14 * 14)
    per_row = (batch["input_ids"] == processor.video_token_id).sum(1)
    assert per_row.tolist() == [4 * 4 * 4 // 4] * 3  # merge 2x2 -> 16 tokens per video
    assert batch["attention_mask"][:, -1].all()  # left padding
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_chat_template_renders_qwen_layout(tiny_policy):
    _, processor = tiny_policy
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_not_a_qwen_checkpoint_is_a_clear_error(tmp_path, tiny_checkpoint):
    with pytest.raises(ModelError, match="checkpoint directory not found"):
        check_checkpoint(tmp_path / "missing")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="model_type is 'llama'"):
        check_checkpoint(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        check_checkpoint(tmp_path / "empty")
    assert check_checkpoint(tiny_checkpoint)["model_type"] == "qwen2_5_vl"


def test_pointer_checkpoint_resolves(tmp_path, tiny_checkpoint):
    import json

    from appo.models.loading import resolve_checkpoint

    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "checkpoint.json").write_text(json.dumps({"path": str(tiny_checkpoint)}))
    assert resolve_checkpoint(tmp_path / "init") == tiny_checkpoint
    assert check_checkpoint(tmp_path / "init")["model_type"] == "qwen2_5_vl"
