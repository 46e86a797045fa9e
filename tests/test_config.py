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
