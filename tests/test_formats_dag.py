"""Every public annotation format through ``dvc repro`` (issue 17): a copy of the project whose
params point at one fixture of each format, SFT and RL (APPO) on a Video-R1-260k-style file
that mixes image and video records, evaluation on all of them as extra benchmarks.

The fixtures are the ones of ``test_real_formats`` (the exact field layouts of the public
releases, with our own records and tiny media); the DVC project is built like ``test_dag``'s.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # sibling test modules, whatever the import mode

from test_dag import MICRO, ROOT, _dvc, _env, _ran, _run  # noqa: E402
from test_real_formats import EVERY_FORMAT_COUNTS, every_format_benchmarks  # noqa: E402

from appo.workspace import apply_overrides  # noqa: E402


@pytest.mark.slow
def test_every_format_through_dvc_repro(tmp_path: Path) -> None:
    mixed, benchmarks = every_format_benchmarks(tmp_path / "media")
    repo = tmp_path / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("appo", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    for name in ("dvc.yaml", "pyproject.toml", ".gitignore"):
        shutil.copy2(ROOT / name, repo / name)
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), MICRO)
    params["data"].update(source="files", files={"sft": str(mixed), "rl": str(mixed)})
    params["eval"].update(splits=[], benchmarks=benchmarks, perception_layers=[])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(tmp_path) | {"APPO_MLFLOW": "0"}
    _run(["git", "init", "-q"], repo, env)
    _dvc(repo, env, "init", "-q")

    out = _dvc(repo, env, "repro", "eval@appo")
    assert _ran(out) == {"data", "frames", "init_model", "sft", "rl@appo", "eval@appo"}
    counts = json.loads((repo / "data" / "dataset" / "summary.json").read_text())
    assert counts == {"sft": 3, "rl": 3}
    rl = [json.loads(line) for line in
          (repo / "outputs" / "rl" / "appo" / "metrics.jsonl").read_text().splitlines()]
    assert rl and all(row.get("appo/num_crucial_frames", 1) >= 1 for row in rl)
    metrics = json.loads((repo / "outputs" / "eval" / "appo" / "metrics.json").read_text())
    assert {name: stats["n"] for name, stats in metrics["benchmarks"].items()} == \
        EVERY_FORMAT_COUNTS
    assert metrics["missing"] == []
    assert "mIoU" in metrics["benchmarks"]["nextgqa_csv"]
