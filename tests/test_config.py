import pytest

from appo.config import ConfigError, DataConfig, FramesConfig, ModelConfig, from_dict, load_section


def test_defaults_and_nested_values():
    cfg = from_dict(DataConfig, {"synthetic": {"fps": 2, "sft": 10}})
    assert cfg.synthetic.fps == 2.0 and isinstance(cfg.synthetic.fps, float)
    assert cfg.synthetic.sft == 10 and cfg.synthetic.rl == 256


def test_unknown_key_names_the_dotted_path():
    with pytest.raises(ConfigError, match=r"unknown key 'data\.synthetic\.sizee'"):
        from_dict(DataConfig, {"synthetic": {"sizee": 3}}, "data")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"num_frames": "8"}, r"'frames\.num_frames' must be int"),
        ({"num_frames": True}, r"'frames\.num_frames' must be int, got a boolean"),
        ({"fps": "fast"}, r"frames\.fps"),
        ({"workers": 1.5}, r"'frames\.workers' must be int"),
    ],
)
def test_wrong_types_are_rejected(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(FramesConfig, raw, "frames")


def test_optional_and_mapping_fields():
    assert from_dict(FramesConfig, {"fps": None}).fps is None
    assert from_dict(ModelConfig, {"path": "/x"}).path == "/x"
    assert from_dict(DataConfig, {"files": {"rl": "a.json"}}).files == {"rl": "a.json"}
    with pytest.raises(ConfigError, match=r"data\.files"):
        from_dict(DataConfig, {"files": ["a.json"]}, "data")


def test_repository_params_file_is_valid():
    for cls, section in ((DataConfig, "data"), (FramesConfig, "frames"), (ModelConfig, "model")):
        load_section(cls, section, "params.yaml")


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_section(DataConfig, "data", tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_section(DataConfig, "data", bad)


# ---------------------------------------------------------------------- APPO perception knobs


def test_perception_K_absolute_or_a_fraction_of_the_response_length():
    from appo.config import DEFAULT_K, PerceptionConfig

    assert PerceptionConfig().tokens_per_frame(40) == DEFAULT_K == 128  # neither set: the paper's
    assert PerceptionConfig(K=512).tokens_per_frame(40) == 512
    assert PerceptionConfig(K_fraction=1 / 3).tokens_per_frame(384) == 128  # the paper's ratio
    assert PerceptionConfig(K_fraction=0.33).tokens_per_frame(40) == 13  # round(13.2)
    assert PerceptionConfig(K_fraction=0.01).tokens_per_frame(40) == 1  # at least one token
    assert PerceptionConfig(K_fraction=1.0).tokens_per_frame(40) == 40


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"K": 128, "K_fraction": 0.33}, r"perception: 'K' \(128\) and 'K_fraction' \(0.33\) are "
                                         r"both set"),
        ({"K_fraction": 0.0}, r"'K_fraction' must be in \(0, 1\]"),
        ({"K_fraction": 1.5}, r"'K_fraction' must be in \(0, 1\]"),
        ({"K": 0}, r"'K' must be >= 1"),
        ({"attention": "uniform"}, r"'attention' is 'uniform'; expected one of policy, random"),
        ({"weights": "random"}, r"'weights' is 'random'; expected one of divergence, uniform"),
    ],
)
def test_bad_perception_knobs_name_the_key(raw, message):
    from appo.config import PerceptionConfig

    with pytest.raises(ConfigError, match=message):
        from_dict(PerceptionConfig, raw, "rl.algorithms.appo.perception")


def test_appo_control_presets_differ_from_appo_in_one_knob_each():
    """appo-random / appo-uniform are APPO with exactly one control knob changed, and APPO's
    K is a fraction of the response length that leaves it below the response length."""
    import dataclasses

    from appo.config import RLConfig

    cfg = load_section(RLConfig, "rl", "params.yaml")
    appo = cfg.algorithm("appo")
    assert (appo.perception.attention, appo.perception.weights) == ("policy", "divergence")
    assert dataclasses.replace(appo, perception=dataclasses.replace(
        appo.perception, attention="random")) == cfg.algorithm("appo-random")
    assert dataclasses.replace(appo, perception=dataclasses.replace(
        appo.perception, weights="uniform")) == cfg.algorithm("appo-uniform")
    assert appo.perception.K_fraction is not None
    assert appo.perception.tokens_per_frame(cfg.max_new_tokens) < cfg.max_new_tokens


def test_sft_freeze_vision_accepts_true_false_or_auto(tmp_path):
    from appo.config import ConfigError, SFTConfig, load_section

    for value in (True, False, "auto"):
        path = tmp_path / "p.yaml"
        path.write_text(f"sft: {{freeze_vision: {str(value).lower()}}}\n")
        assert load_section(SFTConfig, "sft", path).freeze_vision == value
    path.write_text("sft: {freeze_vision: sometimes}\n")
    with pytest.raises(ConfigError, match="sft.freeze_vision"):
        load_section(SFTConfig, "sft", path)


def test_threads_knob_is_validated_and_pins_torch(tmp_path):
    """params.yaml's top-level ``threads`` pins torch's CPU threads in every stage process
    (results depend on the reduction order); 0 leaves torch's default; bad values are named."""
    import torch

    from appo.config import cpu_threads
    from appo.stages import _pin_threads

    assert cpu_threads({}) == 0 and cpu_threads({"threads": 3}) == 3
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"\(threads\)"):
            cpu_threads({"threads": bad}, "p.yaml")
    before = torch.get_num_threads()
    path = tmp_path / "params.yaml"
    try:
        path.write_text("threads: 1\n")
        _pin_threads(["--params", str(path)])
        assert torch.get_num_threads() == 1
        path.write_text("threads: 0\n")
        torch.set_num_threads(2)
        _pin_threads([f"--params={path}"])
        assert torch.get_num_threads() == 2  # 0: untouched
    finally:
        torch.set_num_threads(before)
