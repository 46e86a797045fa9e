import pytest

from appo.io import atomic_dir, atomic_write_text


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    def broken_write(self, text):
        raise Boom

    monkeypatch.setattr("pathlib.Path.write_text", broken_write)
    with pytest.raises(Boom):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_atomic_dir_replaces_whole_directory(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_video_encoding_is_deterministic(tmp_path):
    """The same frames written twice decode to the same pixels (lossy x264 did not, in a few
    percent of videos), so the data stage, and all training on it, is reproducible."""
    import decord
    import numpy as np

    from appo.config import SyntheticConfig
    from appo.data.synthetic import make_question
    from appo.io import atomic_write_video

    rng = np.random.default_rng(0)
    for i in range(24):
        frames, _ = make_question("flash_color", rng, SyntheticConfig())
        decoded = []
        for copy in ("a", "b"):
            path = tmp_path / f"{i}{copy}.mp4"
            atomic_write_video(path, frames, 4.0)
            decoded.append(decord.VideoReader(str(path)).get_batch(list(range(16))).asnumpy())
        assert np.array_equal(decoded[0], decoded[1]), f"video {i} decodes differently"
        # lossless apart from the yuv420p colour conversion (half-resolution chroma): 3.9 here
        assert np.abs(decoded[0].astype(int) - frames.astype(int)).mean() < 6
