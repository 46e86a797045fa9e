"""The orchestration layer: DVC DAG, Prefect flow, MLflow parent/child runs, report, compare.

The end-to-end tests share one micro pipeline (module fixture ``micro``): a temporary copy of
the project (appo/, flows/, dvc.yaml, pyproject.toml, a micro params.yaml) as a fresh git + DVC
repository with a temporary sqlite MLflow store, reproduced once from scratch by the Prefect
flow under ``prefect_test_harness`` (one task per DVC stage, each ``dvc repro --single-item``).

(b) Prefect: every stage task ran, in DAG order; the plan for an algorithm subset;
(a) DVC: a second ``dvc repro`` runs nothing and ``dvc status`` is clean; changing
    ``rl.algorithms.appo.perception.w_max`` makes only rl@appo stale, and ``python -m appo run``
    (``dvc repro`` under an MLflow parent run: what ``make run`` does) reruns only rl@appo,
    report and (when the model changed) eval@appo;
(c) MLflow: the flow's parent run has one child per logging stage with tags, params, metrics
    and artifacts; ``python -m appo compare`` (MLflow and --from-files) prints the table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from appo.config import BASELINES, RLConfig
from appo.workspace import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "data.synthetic.sft=8", "data.synthetic.rl=8", "data.synthetic.val=4",
    "data.synthetic.test=8", "frames.workers=1",
    "sft.max_steps=2", "sft.batch_size=4", "sft.warmup_steps=0", "sft.save_every=0",
    "rl.steps=1", "rl.prompts_per_step=2", "rl.num_generations=2",
    "rl.groups_per_micro_batch=2", "rl.max_new_tokens=8",
    "eval.max_new_tokens=8", "eval.batch_size=8",
]
ALGORITHMS = ("grpo", "dapo", "appo", "appo-random", "tgrpo")  # the DAG's rl@ items, in order
PRESETS_OUTSIDE_DAG = {"appo-uniform"}  # presets run by hand / in experiment files only
ALL_STAGES = {"data", "frames", "init_model", "sft", "eval_baseline@base", "eval_baseline@sft",
              "report",
              *(f"rl@{a}" for a in ALGORITHMS), *(f"eval@{a}" for a in ALGORITHMS)}
LOGGING_STAGES = ALL_STAGES  # every stage logs an MLflow run


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


# --------------------------------------------------------------------------------------------
# fast checks


def test_rl_stage_lists_each_shared_rl_key_and_only_its_own_preset():
    stages = _dvc_yaml()["stages"]
    rl_params = set(stages["rl"]["do"]["params"])
    shared = {f"rl.{f.name}" for f in fields(RLConfig) if f.name != "algorithms"}
    assert shared <= rl_params, f"missing shared rl keys: {sorted(shared - rl_params)}"
    assert "rl.algorithms.${item}" in rl_params
    assert "rl" not in rl_params and "rl.algorithms" not in rl_params
    for name, stage in stages.items():  # nobody else reads rl.* or the whole section
        body = stage.get("do", stage)
        if name != "rl":
            assert not [p for p in body.get("params", []) if str(p).startswith("rl")], name


def test_dvc_metrics_are_headline_files_in_git_and_outputs_are_cached():
    """DVC's metrics are the small headline files under metrics/ (cache: false, not ignored by
    git, so `dvc exp run` commits them); every output under the gitignored outputs/ is cached
    (an uncached one is lost for good when a stage fails after DVC removed it)."""
    stages = _dvc_yaml()["stages"]
    metrics, outs = [], []
    for stage in stages.values():
        body = stage.get("do", stage)
        metrics += body.get("metrics", [])
        outs += body.get("outs", []) + body.get("plots", [])
    paths = [next(iter(m)) for m in metrics]
    assert paths == ["metrics/sft.json", "metrics/eval/${key}.json", "metrics/rl/${item}.json",
                     "metrics/eval/${item}.json"]
    assert all(next(iter(m.values())) == {"cache": False} for m in metrics)
    examples = [re.sub(r"\$\{(item|key)\}", "appo", p) for p in paths]
    ignored = subprocess.run(["git", "check-ignore", *examples], cwd=ROOT, capture_output=True,
                             text=True, check=False).stdout.split()
    assert ignored == []
    assert all(isinstance(o, str) for o in outs), [o for o in outs if not isinstance(o, str)]


def test_dvc_metrics_show_fits_160_columns(tmp_path):
    """`dvc metrics show` over every stage's headline file: one row per file, fixed keys."""
    from appo.headline import rebuild

    families = {f"family_{i}": {"accuracy": 0.5} for i in range(12)}  # not in the headline
    for name in ("base", "sft", *ALGORITHMS):
        out = tmp_path / "outputs" / "eval" / name
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"overall": {
            "accuracy": 0.44140625, "ci95": [0.40234375, 0.48046875],
            "perception_hit_rate": 0.3828125}, "by_family": families}))
    for algo in ALGORITHMS:
        out = tmp_path / "outputs" / "rl" / algo
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({
            "final_reward": 0.51234567, "final_accuracy": 0.4123, "train_time_s": 1812.31,
            "steps": 640}))
    (tmp_path / "outputs" / "sft").mkdir()
    (tmp_path / "outputs" / "sft" / "metrics.json").write_text(json.dumps({
        "final_loss": 1.234567, "train_time_s": 812.3}))
    env = _env(tmp_path)
    _run(["git", "init", "-q"], tmp_path, env)
    _dvc(tmp_path, env, "init", "-q")
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        written = rebuild()
    assert len(written) == 2 + 2 * len(ALGORITHMS) + 1
    assert json.loads((tmp_path / "metrics" / "eval" / "appo.json").read_text()) == {
        "accuracy": 0.4414, "ci_hi": 0.4805, "ci_lo": 0.4023, "hit_rate": 0.3828}
    table = _dvc(tmp_path, env, "metrics", "show").splitlines()
    assert len(table) == 1 + len(written)
    assert max(len(line) for line in table) <= 160, "\n".join(table)


def test_every_preset_is_trained_evaluated_and_reported():
    """The algorithms are written once (``vars: algorithms``): rl, eval and both per-step plots
    iterate over that list, and the report depends on the folders every variant writes into, so
    a preset cannot be left out of the comparison by accident. Each rl.algorithms preset of
    params.yaml (but the listed controls outside the DAG) is in the list."""
    dag = _dvc_yaml()
    all_presets = set(yaml.safe_load((ROOT / "params.yaml").read_text())["rl"]["algorithms"])
    assert all_presets == set(ALGORITHMS) | PRESETS_OUTSIDE_DAG
    assert dag["vars"][0]["algorithms"] == list(ALGORITHMS)

    def strings(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        else:
            yield str(node)

    for text in strings([dag["stages"], dag["plots"]]):  # no algorithm named outside vars
        assert not [a for a in ALGORITHMS if text == a or f"/{a}/" in text or f"/{a}." in text
                    or f"@{a}" in text or f"--algo {a}" in text], text
    assert dag["stages"]["rl"]["foreach"] == dag["stages"]["eval"]["foreach"] == "${algorithms}"
    assert set(dag["vars"][1]["baselines"]) == set(BASELINES)
    assert {"outputs/rl", "outputs/eval"} <= set(dag["stages"]["report"]["deps"])
    for plot in dag["plots"][:2]:
        (spec,) = plot.values()
        assert list(spec["y"].values()) == ["${algorithms}"]
    # the baselines' evaluation is the algorithms' one: same code deps, params and outputs
    ev, base = dag["stages"]["eval"]["do"], dag["stages"]["eval_baseline"]["do"]
    assert ev["deps"][:-1] == base["deps"][:-1] and ev["params"] == base["params"]
    assert [o.replace("${item}", "X") for o in ev["outs"]] == \
        [o.replace("${key}", "X") for o in base["outs"]]
    assert ev["cmd"].replace("outputs/rl/${item}/model", "${item}").replace("${item}", "X") == \
        base["cmd"].replace("${key}", "X").replace("${item}", "X")


def test_compare_table_keeps_variant_names_whole():
    import pandas as pd

    from appo.compare import format_table

    df = pd.DataFrame({"pipeline": ["0123456789abcdef"] * 2, "variant": ["appo-random",
                                                                        "appo-uniform"]})
    rows = [line.split() for line in format_table(df).splitlines()[1:]]
    assert rows == [["01234567", "appo-random"], ["01234567", "appo-uniform"]]


def test_mlflow_experiment_opens_on_model_training(tmp_path, monkeypatch):
    """MLflow 3 opens an experiment without a kind in GenAI mode; ours is model training."""
    import mlflow

    from appo.mlflow_setup import configure

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    configure("kind-test")
    tags = mlflow.get_experiment_by_name("kind-test").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_dvc_experiment_runs_nest_under_an_experiment_parent(tmp_path, monkeypatch):
    """Under `dvc exp run` (DVC_EXP_NAME) the stage runs nest under one parent per experiment
    and carry the experiment's name and the params fingerprint."""
    import mlflow

    from appo.mlflow_setup import PARENT_ENV, params_fingerprint
    from appo.tracking import RunLogger

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\nrl: {steps: 3}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("APPO_MLFLOW", "1")
    monkeypatch.setenv("DVC_EXP_NAME", "warm-hats")
    monkeypatch.delenv(PARENT_ENV, raising=False)
    for name in ("rl-appo", "eval-appo"):
        with RunLogger(tmp_path / name, name, tags={"algorithm": "appo"}) as log:
            log.log_metrics({"x": 1.0}, step=0)
    runs = mlflow.search_runs(experiment_names=["appo"])
    parent = runs[runs["tags.dvc_stage"] == "experiment"]
    assert len(parent) == 1 and parent.iloc[0]["tags.dvc_exp"] == "warm-hats"
    children = runs[runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert sorted(children["tags.mlflow.runName"]) == ["eval-appo", "rl-appo"]
    assert (children["tags.dvc_exp"] == "warm-hats").all()
    assert (children["tags.config"] == params_fingerprint()).all()
    assert params_fingerprint() != "-"


def test_compare_and_report_say_where_each_row_comes_from(tmp_path, monkeypatch):
    from appo.compare import compare
    from appo.stages.report import load_results, render_markdown

    monkeypatch.setenv("APPO_MLFLOW", "0")
    for name, exp in (("sft", "-"), ("appo", "warm-hats")):
        out = tmp_path / "eval" / name
        out.mkdir(parents=True)
        stats = {"n": 8, "accuracy": 0.5, "ci95": [0.2, 0.8]}
        (out / "metrics.json").write_text(json.dumps({
            "overall": stats, "benchmarks": {"test": stats}, "by_family": {},
            "provenance": {"dvc_exp": exp, "config": f"cfg-{name}"}}))
    lines = compare(from_files=True, outputs=str(tmp_path)).splitlines()
    assert lines[0].split()[:3] == ["variant", "exp", "config"]
    assert lines[2].split()[:3] == ["appo", "warm-hats", "cfg-appo"]
    report = render_markdown(load_results(tmp_path), [])
    assert "Mixed sources" in report and "appo: exp warm-hats, params cfg-appo" in report


def test_prefect_task_log_drops_dvcs_git_hints(tmp_path):
    """`dvc repro` ends each stage with ~5 lines of git advice; the task log keeps the rest."""
    from flows.pipeline import is_git_hint

    env = _env(tmp_path)
    _run(["git", "init", "-q"], tmp_path, env)
    _dvc(tmp_path, env, "init", "-q")
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n"
                                       "    outs: [out.txt]\n")
    lines = [line for line in _dvc(tmp_path, env, "repro").splitlines() if line.strip()]
    kept = [line for line in lines if not is_git_hint(line)]
    assert any("git add" in line for line in lines)  # DVC does give the advice
    assert not [line for line in kept if "git add" in line or "autostage" in line], kept
    assert "Running stage 'hello':" in kept


def test_report_marks_differences_inside_and_outside_the_ci(tmp_path, monkeypatch):
    from appo.stages.report import load_results, run

    monkeypatch.setenv("APPO_MLFLOW", "0")

    def write_eval(name: str, n_correct: int, n: int = 60) -> None:
        rows = [{"benchmark": "test", "problem_id": str(i), "family": "f", "correct": i < n_correct,
                 "perception_hit": i % 2 == 0} for i in range(n)]
        out = tmp_path / "outputs" / "eval" / name
        out.mkdir(parents=True)
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        acc = n_correct / n
        stats = {"n": n, "accuracy": acc, "ci95": [acc - 0.1, acc + 0.1], "reward": acc,
                 "perception_hit_rate": 0.5}
        (out / "metrics.json").write_text(json.dumps({
            "overall": stats, "benchmarks": {"test": stats}, "by_family": {"f": stats}}))

    write_eval("sft", 20)
    write_eval("grpo", 22)
    write_eval("appo", 50)
    for algo in ("grpo", "appo"):
        out = tmp_path / "outputs" / "rl" / algo
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"final_reward": 0.5, "steps": 3,
                                                      "train_time_s": 1.0}))
        (out / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "reward": 0.1 * s, "accuracy": 0.2}) + "\n" for s in range(3)))
    summary = run(tmp_path / "outputs", tmp_path / "report")
    diffs = summary["differences"]
    assert diffs["grpo-sft/test"]["inside_ci"] is True
    assert diffs["appo-sft/test"]["inside_ci"] is False
    assert diffs["appo-grpo/test"]["inside_ci"] is False
    # exact McNemar: 2 of 2 discordant questions for grpo, 30 of 30 for appo
    assert diffs["grpo-sft/test"]["p_value"] == pytest.approx(0.5)
    assert diffs["appo-sft/test"]["p_value"] == pytest.approx(2 * 0.5**30)
    assert summary["appo"]["acc/test"] == pytest.approx(50 / 60)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "outside CI" in report and "appo vs sft on test" in report
    for png in ("reward_curves", "accuracy_curves", "final_accuracy", "perception_hit_rate"):
        assert (tmp_path / "report" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    curves = (tmp_path / "report" / "reward_curves.csv").read_text().splitlines()
    assert curves[0] == "step,grpo,appo" and len(curves) == 4
    assert load_results(tmp_path / "outputs").variants == ["sft", "grpo", "appo"]


# --------------------------------------------------------------------------------------------
# the micro pipeline


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONPATH": "",  # the copy's appo/ (cwd) must win over the checkout's
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "APPO_MLFLOW": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # tiny tensors: one thread per process is faster on 2 cores
        "TQDM_DISABLE": "1",
        "DVC_NO_ANALYTICS": "1",
    })
    env.pop("APPO_PARENT_RUN_ID", None)
    env.pop("DVC_STAGE", None)
    return env


def _run(args: list[str], repo: Path, env: dict[str, str], stdout_only: bool = False) -> str:
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{out[-5000:]}"
    return proc.stdout if stdout_only else out


def _dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], repo, env, stdout_only="--json" in args)


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro project, reproduced once from scratch by the Prefect flow (one task per DVC
    stage, each ``dvc repro --single-item``) under prefect_test_harness."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("dag")
    repo = tmp / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("appo", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    for name in ("dvc.yaml", "pyproject.toml", ".gitignore"):  # outputs/ ignored as in the project
        shutil.copy2(ROOT / name, repo / name)
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), MICRO)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(tmp)
    _run(["git", "init", "-q"], repo, env)
    _dvc(repo, env, "init", "-q")
    _dvc(repo, env, "config", "core.analytics", "false")
    _dvc(repo, env, "config", "core.check_update", "false")
    params_text = (repo / "params.yaml").read_text()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "APPO_MLFLOW", "OMP_NUM_THREADS", "TQDM_DISABLE",
                    "PYTHONPATH", "DVC_NO_ANALYTICS"):
            mp.setenv(key, env[key])
        mp.delenv("APPO_PARENT_RUN_ID", raising=False)
        with prefect_test_harness(server_startup_timeout=600):  # slow on a busy machine
            results = pipeline(project_dir=str(repo), jobs=2)  # stages side by side
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                artifacts = client.read_artifacts()
    return SimpleNamespace(repo=repo, env=env, tmp=tmp, results=results,
                           params_text=params_text, artifacts=artifacts)


def _mlflow_runs(micro):
    import mlflow

    mlflow.set_tracking_uri(micro.env["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=["appo"], output_format="pandas")


def _model_md5(lock: dict, stage: str) -> str:
    return next(o["md5"] for o in lock[stage]["outs"] if o["path"].endswith("/model"))


@pytest.mark.slow
def test_prefect_flow_ran_every_stage_in_dag_order(micro):
    from flows.pipeline import plan

    repo = micro.repo
    order = ["data", "frames", "init_model", "sft", "eval_baseline@base", "eval_baseline@sft",
             *(f"rl@{a}" for a in ALGORITHMS),
             *(f"eval@{a}" for a in ALGORITHMS), "report"]
    assert list(micro.results) == order
    assert set(micro.results.values()) == {"ran"}
    (artifact,) = [a for a in micro.artifacts if a.key == "appo-comparison"]
    assert "variant" in artifact.data and "MLflow parent run: [" in artifact.data
    assert "/#/experiments/" in artifact.data
    assert (repo / "params.yaml").read_text() == micro.params_text  # no overrides: untouched
    assert plan(["grpo"], repo) == ["data", "frames", "init_model", "sft", "eval_baseline@base",
                                    "eval_baseline@sft", "rl@grpo", "eval@grpo", "report"]
    with pytest.raises(ValueError, match="not in dvc.yaml"):
        plan(["ppo"], repo)
    from flows.pipeline import plan_graph

    # --stages sft: the stage and what it needs (a sweep's shared upstream)
    assert plan_graph(None, repo, ["sft", "eval_baseline@sft"]) == {
        "data": set(), "frames": {"data"}, "init_model": set(),
        "sft": {"data", "frames", "init_model"},
        "eval_baseline@sft": {"data", "frames", "init_model", "sft"}}
    with pytest.raises(ValueError, match=r"stages \['sftt'\] are not in the plan"):
        plan_graph(None, repo, ["sftt"])
    report = repo / "outputs" / "report"
    for name in ("report.md", "summary.json", "comparison.csv", "reward_curves.png",
                 "accuracy_curves.png", "final_accuracy.png", "perception_hit_rate.png",
                 "reward_curves.csv", "train_accuracy_curves.csv", "final_accuracy.csv"):
        assert (report / name).is_file(), name


@pytest.mark.slow
def test_dvc_repro_reruns_nothing_then_only_the_changed_algorithm(micro):
    repo, env = micro.repo, micro.env
    assert set(_dvc(repo, env, "stage", "list", "--name-only").split()) == ALL_STAGES
    again = _dvc(repo, env, "repro")
    assert _ran(again) == set() and "Data and pipelines are up to date" in again
    assert json.loads(_dvc(repo, env, "status", "--json")) == {}

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["rl"]["algorithms"]["appo"]["perception"]["w_max"] = 1.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(_dvc(repo, env, "status", "--json"))) == {"rl@appo"}

    before = _lock(repo)
    # what `make run` does: dvc repro under one MLflow parent run
    ran = _ran(_run([sys.executable, "-m", "appo", "run"], repo, env))
    after = _lock(repo)
    # A 1-step micro run whose group rewards tie has zero advantages: then the weights (and the
    # model hash) do not change and DVC rightly skips eval@appo.
    changed = _model_md5(before, "rl@appo") != _model_md5(after, "rl@appo")
    assert ran == {"rl@appo", "report"} | ({"eval@appo"} if changed else set())
    assert after["rl@appo"]["params"]["params.yaml"]["rl.algorithms.appo"]["perception"][
        "w_max"] == 1.5
    for stage in ALL_STAGES - {"rl@appo", "eval@appo", "report"}:
        assert after[stage] == before[stage], stage
    assert _ran(_dvc(repo, env, "repro")) == set()


@pytest.mark.slow
def test_override_run_restores_upstream_and_leaves_the_project_alone(micro):
    """``python -m appo run --set``: the run happens in its own workspace over the project's DVC
    cache, where every upstream stage is restored from DVC's run cache and only the stage the
    override changes runs; the project's params.yaml, dvc.lock and outputs stay as they were."""
    repo, env = micro.repo, micro.env
    project_files = ("params.yaml", "dvc.lock", "outputs/eval/grpo/metrics.json")
    before = {name: (repo / name).read_bytes() for name in project_files}
    out = _run([sys.executable, "-m", "appo", "run", "eval@grpo",
                "--set", "eval.max_new_tokens=6"], repo, env)
    assert _ran(out) == {"eval@grpo"}
    assert set(re.findall(r"Stage '([^']+)' is cached - skipping run", out)) == {
        "data", "frames", "init_model", "sft", "rl@grpo"}
    (ws,) = (repo / "outputs" / "runs").iterdir()
    assert ws.name.startswith("eval.max_new_tokens=6-")
    assert yaml.safe_load((ws / "params.yaml").read_text())["eval"]["max_new_tokens"] == 6
    assert json.loads((ws / "outputs/eval/grpo/metrics.json").read_text())["overall"]
    assert _model_md5(_lock(ws), "rl@grpo") == _model_md5(_lock(repo), "rl@grpo")
    assert {name: (repo / name).read_bytes() for name in project_files} == before
    assert json.loads(_dvc(repo, env, "status", "--json")) == {}  # the workspace is not seen
    runs = _mlflow_runs(micro)  # logged to the project's store
    (parent_id,) = runs[runs["params.overrides"] == "eval.max_new_tokens=6"]["run_id"]
    children = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    assert list(children["tags.dvc_stage"]) == ["eval@grpo"]


@pytest.mark.slow
def test_mlflow_parent_child_runs_and_compare(micro):
    runs = _mlflow_runs(micro)
    parents = runs[runs["tags.runner"] == "prefect"]
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert parent["status"] == "FINISHED" and parent["tags.dvc_stage"] == "pipeline"
    assert parent["tags.data_fingerprint"] and parent["params.algorithms"] == "all"
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert sorted(children["tags.dvc_stage"]) == sorted(LOGGING_STAGES)
    assert (children["status"] == "FINISHED").all()
    for tag in ("git_commit", "seed", "data_fingerprint"):
        assert children[f"tags.{tag}"].notna().all(), tag
    assert (children["tags.data_fingerprint"] == parent["tags.data_fingerprint"]).all()
    by_stage = {r["tags.dvc_stage"]: r for _, r in children.iterrows()}
    for stage in LOGGING_STAGES:
        if "@" in stage:
            assert by_stage[stage]["tags.algorithm"] == stage.split("@")[1]
    assert by_stage["rl@appo"]["params.algo"] == "appo"
    assert by_stage["rl@appo"]["metrics.final/steps"] == 1
    assert 0.0 <= by_stage["eval@appo"]["metrics.overall/accuracy"] <= 1.0
    assert 0.0 <= by_stage["eval@appo"]["metrics.overall/perception_hit_rate"] <= 1.0

    import mlflow

    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(by_stage["report"]["run_id"])}
    assert {"report.md", "summary.json", "reward_curves.png", "final_accuracy.png"} <= artifacts
    assert "metrics.json" in {a.path for a in client.list_artifacts(by_stage["eval_baseline@sft"]["run_id"])}
    # the report's comparison is a table artifact, not per-variant metrics crowding the charts
    assert {"comparison.json", "differences.json"} <= artifacts
    assert not [c for c in runs.columns if c.startswith("metrics.")
                and runs.loc[by_stage["report"].name, c] == runs.loc[by_stage["report"].name, c]]
    assert by_stage["data"]["metrics.questions/test"] == 8
    assert client.get_experiment_by_name("appo").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    assert "report.md" in {a.path for a in client.list_artifacts(parent["run_id"])}

    table = _run([sys.executable, "-m", "appo", "compare"], micro.repo, micro.env, True)
    files = _run([sys.executable, "-m", "appo", "compare", "--from-files"], micro.repo,
                 micro.env, True)
    for out in (table, files):
        lines = [line for line in out.splitlines() if line.strip()]
        header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("variant"))
        assert "test acc % [95% CI]" in lines[header] and "perception hit %" in lines[header]
        assert "RL reward" in lines[header] and "train time s" in lines[header]
        rows = [line.split()[0] for line in lines[header + 1:]]
        assert rows == ["base", "sft", *ALGORITHMS]


@pytest.mark.slow
def test_dvc_exp_metrics_plots_and_a_two_seed_experiment(micro):
    """`dvc exp run -S` reruns only what the knob touches; `dvc metrics show` / `dvc plots
    show` read the stages' outputs; `python -m appo experiment` runs 2 seeds through the
    pipeline and writes the aggregate table."""
    repo, env = micro.repo, dict(micro.env)
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"})
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "micro"], repo, env)
    out = _dvc(repo, env, "exp", "run", "-S", "rl.algorithms.appo.perception.k_f=2")  # default 1
    assert _ran(out) <= {"rl@appo", "eval@appo", "report"} and "rl@appo" in _ran(out)
    metrics = json.loads(_dvc(repo, env, "metrics", "show", "--json"))
    flat = json.dumps(metrics)
    assert "metrics/eval/appo.json" in flat and "metrics/rl/tgrpo.json" in flat
    # the experiment's commit carries its headline metrics: both rows have them, not "!"
    from io import StringIO

    import pandas as pd

    table = pd.read_csv(StringIO(_dvc(repo, env, "exp", "show", "--csv")))
    rows = table[table["typ"].isin(["baseline", "branch_base", "branch_commit"])
                 & (table["rev"] != "workspace")]
    assert len(rows) == 2, table[["rev", "typ"]]
    for column in ("metrics/eval/appo.json:accuracy", "metrics/rl/appo.json:reward",
                   "metrics/eval/sft.json:accuracy"):
        assert rows[column].notna().all() and (rows[column] != "!").all(), column
    md = _dvc(repo, env, "exp", "show", "--md", "--only-changed", "--no-pager")
    # the knob is the changed column (the micro run's accuracy/reward may not move: 1 step)
    assert "rl.algorithms.appo.perception.k_f" in md and "metrics/" in md, md
    assert max(len(line) for line in md.splitlines()) <= 400, md
    _dvc(repo, env, "plots", "show", "-o", str(micro.tmp / "plots"))
    assert (micro.tmp / "plots" / "index.html").is_file()

    (repo / "experiments").mkdir(exist_ok=True)
    (repo / "experiments" / "micro.yaml").write_text(yaml.safe_dump({
        "name": "micro", "split": "test", "seeds": [0, 1], "algorithms": ["grpo"]}))
    text = _run([sys.executable, "-m", "appo", "experiment", "experiments/micro.yaml"], repo,
                env, stdout_only=True)
    results = json.loads((repo / "outputs" / "experiments" / "micro" / "results.json")
                         .read_text())
    assert results["table"]["grpo"]["seeds"] == [0, 1]
    assert "sft" in results["baselines"]
    assert "| grpo | 0,1 |" in text
    for seed in (0, 1):
        assert (repo / "outputs" / "experiments" / "micro" / "main" / f"seed-{seed}" / "grpo"
                / "eval_metrics.json").is_file()


def test_make_ui_keeps_prefect_state_in_the_checkout_and_checks_the_port_first(tmp_path):
    """Two checkouts' `make ui` must not share ~/.prefect; a port in use fails before the
    "Prefect UI: ..." banner, with the way out."""
    import socket

    from flows.serve import check_port_free

    dry = subprocess.run(["make", "-n", "-p", "ui", f"VENV={Path(sys.executable).parent.parent}"],
                         cwd=ROOT, capture_output=True, text=True, check=False).stdout
    assert f"PREFECT_HOME := {ROOT}/.prefect" in dry
    lines = dry.splitlines()
    check = next(i for i, line in enumerate(lines) if "--check-port" in line)
    banner = next(i for i, line in enumerate(lines) if 'echo "Prefect UI:' in line)
    assert check < banner
    assert subprocess.run(["git", "check-ignore", "-q", ".prefect/"], cwd=ROOT).returncode == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port} .* in use.*PREFECT_PORT={port + 1}"):
            check_port_free(port)
    check_port_free(port)  # closed again: free


def test_make_run_is_the_prefect_flow_on_the_local_ui_server_when_up():
    """`make run` runs flows.pipeline, pointed at this checkout's `make ui` server if it is up."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from flows.serve import local_api

    dry = subprocess.run(["make", "-n", "run", f"VENV={Path(sys.executable).parent.parent}"],
                         cwd=ROOT, capture_output=True, text=True, check=False).stdout
    assert "-m flows.pipeline" in dry and "-m appo run" not in dry

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert local_api(port) == f"http://127.0.0.1:{port}/api"
    finally:
        server.shutdown()
        server.server_close()
    assert local_api(port) is None
