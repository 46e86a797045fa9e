"""Run workspaces (appo/workspace.py): a run with overrides or another params file happens in
its own copy of the project over the shared DVC cache and never touches params.yaml.

The end-to-end check (DVC restores the unchanged stages from the cache, only the overridden
one runs) is ``test_override_run_restores_upstream_and_leaves_the_project_alone`` in
tests/test_dag.py; the kill is in tests/test_faults.py.
"""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from appo.config import ConfigError
from appo.workspace import (
    RUNS_DIR,
    apply_overrides,
    input_paths,
    run_workspace,
    source_files,
    workspace_name,
    workspace_path,
)

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, git: bool) -> Path:
    """A DVC project with the real params.yaml (plus a comment), a module, an ignored data
    folder and an output."""
    from dvc.repo import Repo

    proj = tmp_path / "proj"
    (proj / "appo").mkdir(parents=True)
    (proj / "params.yaml").write_text("# my own comment\n" + (ROOT / "params.yaml").read_text())
    (proj / "dvc.yaml").write_text("stages: {}\n")
    (proj / "appo" / "m.py").write_text("x = 1\n")
    (proj / ".gitignore").write_text("/outputs/\n/data/\n")
    (proj / "data").mkdir()
    (proj / "data" / "big.bin").write_bytes(b"0" * 64)
    (proj / "outputs" / "rl").mkdir(parents=True)
    (proj / "outputs" / "rl" / "metrics.json").write_text("{}")
    if git:
        subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    Repo.init(str(proj), no_scm=not git).close()
    return proj


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and RUNS_DIR.parts[0] not in p.relative_to(path).parts[:1]}


@pytest.mark.parametrize("git", [True, False], ids=["git", "no-git"])
def test_override_run_happens_in_a_workspace_and_leaves_the_project_alone(tmp_path,
                                                                         monkeypatch, git):
    proj = _project(tmp_path, git)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = _tree(proj)
    overrides = ["rl.steps=3", "eval.splits=[val]"]
    with run_workspace(proj, "params.yaml", overrides) as ws:
        assert ws.parent == proj / RUNS_DIR and ws == workspace_path(proj, "params.yaml",
                                                                      overrides)
        assert ws.name.startswith("rl.steps=3,eval.splits=_val_-")
        params = yaml.safe_load((ws / "params.yaml").read_text())
        assert params["rl"]["steps"] == 3 and params["eval"]["splits"] == ["val"]
        assert (ws / "params.yaml").read_text().startswith(
            "# effective params of a run with --set rl.steps=3 --set eval.splits=[val]")
        assert (ws / "appo" / "m.py").read_text() == "x = 1\n"
        assert (ws / "dvc.yaml").is_file() and (ws / ".dvcignore").is_file()
        assert not (ws / "data").exists() and not (ws / "outputs").exists()  # not source
        local = configparser.ConfigParser()
        local.read(ws / ".dvc" / "config.local")
        assert Path(local["cache"]["dir"]) == proj / ".dvc" / "cache"
        assert local["core"]["no_scm"].lower() == "true"
        # the stages log to the project's MLflow store, not one inside the workspace
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{proj / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert _tree(proj) == before  # params.yaml (comment included), outputs/: untouched
    with run_workspace(proj, "params.yaml", []) as same:
        assert same == proj  # its own params unchanged: the project itself


def test_bad_override_fails_before_anything_is_written(tmp_path):
    proj = _project(tmp_path, git=False)
    with pytest.raises(ConfigError, match="rl.stepz"), \
            run_workspace(proj, "params.yaml", ["rl.stepz=3"]):
        pass
    with pytest.raises(ValueError, match="dotted.key=value"):
        apply_overrides({}, ["rl.steps"])
    assert not (proj / RUNS_DIR).exists()


def test_workspace_name_is_one_per_effective_params():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    ten = apply_overrides(params, ["rl.steps=10"])
    name = workspace_name("params.yaml", ["rl.steps=10"], ten)
    assert name == workspace_name("params.yaml", ["rl.steps=10"], ten)
    assert name != workspace_name("params.yaml", ["rl.steps=10"], apply_overrides(ten, ["seed=1"]))
    assert name.startswith("rl.steps=10-") and len(name.rsplit("-", 1)[1]) == 8
    assert workspace_name("configs/big.yaml", [], params).startswith("big-")
    assert "/" not in workspace_name("params.yaml", ["data.out_dir=a/b"], params)


@pytest.mark.parametrize("git", [True, False], ids=["git", "no-git"])
def test_next_run_follows_edits_new_and_deleted_files(tmp_path, git):
    proj = _project(tmp_path, git)
    (proj / "appo" / "gone.py").write_text("")
    with run_workspace(proj, "params.yaml", ["rl.steps=3"]) as ws:
        assert (ws / "appo" / "gone.py").is_file()
    (proj / "appo" / "m.py").write_text("x = 2\n")
    (proj / "appo" / "new.py").write_text("y = 1\n")  # untracked, not ignored: comes along
    (proj / "appo" / "gone.py").unlink()
    with run_workspace(proj, "params.yaml", ["rl.steps=3"]) as again:
        assert again == ws
        assert (ws / "appo" / "m.py").read_text() == "x = 2\n"
        assert (ws / "appo" / "new.py").read_text() == "y = 1\n"
        assert not (ws / "appo" / "gone.py").exists()
    big = proj / "appo" / "big.bin"  # large and untracked: linked, not copied
    big.write_bytes(b"\0" * (8 << 20))
    with run_workspace(proj, "params.yaml", ["rl.steps=3"]):
        assert (ws / "appo" / "big.bin").stat().st_ino == big.stat().st_ino
        assert (ws / "appo" / "m.py").stat().st_ino != (proj / "appo" / "m.py").stat().st_ino
    files = source_files(proj)
    assert "appo/m.py" in files and "params.yaml" not in files
    assert not any(f.startswith(("data/", "outputs/", ".dvc/cache")) for f in files)


def test_relative_inputs_are_linked_outputs_are_not(tmp_path):
    proj = _project(tmp_path, git=False)
    (proj / "ann").mkdir()
    (proj / "ann" / "rl.json").write_text("[]")
    (proj / "videos").mkdir()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"].update(files={"rl": "ann/rl.json", "val": {"path": "/abs/v.json",
                                                             "video_root": "videos"}})
    params["model"]["path"] = "ckpt"  # does not exist: nothing to link
    assert input_paths(params) == ["ckpt", "outputs/sft/model", "ann/rl.json", "videos"]
    (proj / "my.yaml").write_text(yaml.safe_dump(params))
    with run_workspace(proj, "my.yaml", ["rl.steps=1"]) as ws:
        assert ws.name.startswith("my,rl.steps=1-")
        assert (ws / "ann" / "rl.json").resolve() == (proj / "ann" / "rl.json").resolve()
        assert (ws / "ann" / "rl.json").is_symlink() and (ws / "videos").is_symlink()
        assert not (ws / "ckpt").exists()
        assert not (ws / "outputs").exists()  # rl.init is the pipeline's output: DVC's job


def test_one_run_per_workspace_at_a_time(tmp_path):
    proj = _project(tmp_path, git=False)
    with run_workspace(proj, "params.yaml", ["rl.steps=3"]) as ws:
        with pytest.raises(RuntimeError, match="another run with the same params is using"):
            with run_workspace(proj, "params.yaml", ["rl.steps=3"]):
                pass
        with run_workspace(proj, "params.yaml", ["rl.steps=4"]) as other:  # side by side
            assert other != ws
