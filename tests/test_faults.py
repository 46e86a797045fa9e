"""Fault injection (issue 21): full disks, torn files, kills at chosen points, concurrent runs
and bad values. After each fault the user sees one line ``error: ...`` (never a traceback) and
the same command, rerun, continues from the last good state."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, APPO_MLFLOW="0", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _rl_main(params: Path, *extra: str) -> None:
    from appo.stages import rl

    rl.main(["--algo", "grpo", "--params", str(params), *extra])


@pytest.fixture()
def no_mlflow(monkeypatch):
    monkeypatch.setenv("APPO_MLFLOW", "0")


# --------------------------------------------------------------------------------------------
# 1. a torn metrics.jsonl (full disk mid-row) no longer makes every rerun crash


def test_truncate_metrics_drops_torn_lines(tmp_path):
    from appo.tracking import read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    # a torn row of step 2, then a rerun appended right after it without a newline
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew' + '{"step": 2}\n{"step": 3')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
    truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_full_disk_while_logging_rl_metrics_then_rerun_completes(tmp_path, micro_params,
                                                                 monkeypatch, no_mlflow):
    from appo.tracking import RunLogger

    params = micro_params("run", steps=4, save_every=2)
    out = tmp_path / "run" / "rl" / "grpo"
    real_log = RunLogger.log_metrics

    def full_disk(self, metrics, step):
        if step == 3:  # half a row reaches the disk, then it is full
            self._file.write('{"step": 3, "rew')
            self._file.flush()
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_log(self, metrics, step)

    monkeypatch.setattr(RunLogger, "log_metrics", full_disk)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*metrics.jsonl: No space left"):
        _rl_main(params)
    monkeypatch.setattr(RunLogger, "log_metrics", real_log)
    _rl_main(params)
    assert _steps(out / "metrics.jsonl") == [0, 1, 2, 3, 4]  # 4: the final summary row


# --------------------------------------------------------------------------------------------
# 4. RL killed before its first checkpoint: the rerun starts the metrics over


def test_rl_fresh_start_does_not_append_to_an_earlier_attempt(tmp_path, micro_params,
                                                              monkeypatch, no_mlflow):
    from appo.rl.trainer import RLTrainer

    params = micro_params("run", steps=3, save_every=10)
    real_step = RLTrainer.train_step

    def dying_step(self):
        if self.steps_done == 2:
            raise RuntimeError("killed")  # a crash before the first checkpoint (save_every 10)
        return real_step(self)

    monkeypatch.setattr(RLTrainer, "train_step", dying_step)
    with pytest.raises(RuntimeError, match="killed"):
        _rl_main(params)
    monkeypatch.setattr(RLTrainer, "train_step", real_step)
    out = tmp_path / "run" / "rl" / "grpo"
    assert _steps(out / "metrics.jsonl") == [0, 1]
    _rl_main(params)
    assert _steps(out / "metrics.jsonl") == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------
# 5. a truncated file in the newest checkpoint: resume from the previous complete one


@pytest.fixture(scope="module")
def finished_rl(tmp_path_factory, synthetic_data, tiny_checkpoint):
    """A finished micro RL run with checkpoints step-1 and step-2 (and its params)."""
    import yaml

    from appo.stages import rl

    root = tmp_path_factory.mktemp("finished")
    data_dir, store, _ = synthetic_data
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["out_dir"] = str(data_dir)
    params["frames"]["out_dir"] = str(store.dir)
    params["model"]["device"] = "cpu"
    params["rl"].update(init=str(tiny_checkpoint), out_dir=str(root / "rl"), prompts_per_step=2,
                        num_generations=2, max_new_tokens=8, groups_per_micro_batch=1, lr=1e-3,
                        steps=3, save_every=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    old = os.environ.get("APPO_MLFLOW")
    os.environ["APPO_MLFLOW"] = "0"
    try:
        rl.run(str(root / "params.yaml"), "grpo", progress=False)
    finally:
        os.environ.pop("APPO_MLFLOW") if old is None else os.environ.update(APPO_MLFLOW=old)
    shutil.copytree(root / "rl" / "grpo", root / "reference")
    return root


@pytest.mark.parametrize("torn", ["trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"])
def test_truncated_file_in_latest_checkpoint_falls_back(finished_rl, torn, capsys, no_mlflow):
    from appo.stages import rl

    out = finished_rl / "rl" / "grpo"  # same path: the checkpoints' fingerprint covers it
    shutil.rmtree(out)
    shutil.copytree(finished_rl / "reference" / "checkpoints", out / "checkpoints")
    file = out / "checkpoints" / "step-2" / torn
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    rl.run(str(finished_rl / "params.yaml"), "grpo", progress=False)
    err = capsys.readouterr()
    assert f"warning: {file}: unreadable" in err.err
    assert "resuming from" in err.out and "step-1" in err.out
    _assert_same_weights(finished_rl / "reference" / "model", out / "model")


# --------------------------------------------------------------------------------------------
# 3. two runs into one output directory: the second fails at once with one line


def _hold_lock(directory: Path) -> subprocess.Popen:
    """A process holding ``directory``'s output lock until killed."""
    code = ("import sys, time; from appo.io import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_rl_run_into_the_same_output_fails_with_one_line(tmp_path, micro_params):
    params = micro_params("run", steps=2)
    out = tmp_path / "run" / "rl" / "grpo"
    holder = _hold_lock(out)
    try:
        second = subprocess.run([sys.executable, "-m", "appo.stages.rl", "--algo", "grpo",
                                 "--params", str(params)], env=_env(), cwd=REPO,
                                capture_output=True, text=True, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert second.returncode != 0
    assert second.stderr.strip() == (f"error: another run is writing {out} "
                                     f"(lock {out / '.lock'} held by pid {holder.pid})")
    assert not (out / "metrics.jsonl").exists()


def test_output_lock_is_released_when_its_holder_is_killed(tmp_path):
    from appo.io import OutputLockedError, output_lock

    holder = _hold_lock(tmp_path)
    with pytest.raises(OutputLockedError), output_lock(tmp_path):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with output_lock(tmp_path):  # no stale lock after a SIGKILL
        pass


def test_two_concurrent_rl_runs_one_fails(tmp_path, micro_params):
    """The real thing: two RL processes started together; exactly one writes the output."""
    params = micro_params("run", steps=30)  # long enough for the two runs to overlap
    cmd = [sys.executable, "-m", "appo.stages.rl", "--algo", "grpo", "--params", str(params)]
    procs = [subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, err in results if code)
    assert loser.strip().startswith("error: another run is writing"), loser
    out = tmp_path / "run" / "rl" / "grpo"
    assert _steps(out / "metrics.jsonl") == list(range(31))


# --------------------------------------------------------------------------------------------
# 6. directory swaps: a kill at any point leaves the old or the new directory visible, and the
# temporaries of killed writers are deleted on the next start


_SWAP = """
import os, shutil, signal, sys
import appo.io as io
target, point = sys.argv[1], sys.argv[2]

def write(text):
    with io.atomic_dir(target) as tmp:
        (tmp / "weights").write_text(text)

write("old")
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "after-exchange":  # the swap happened; deleting the old copy did not
    io.shutil.rmtree = die
elif point == "between-renames":  # no renameat2: killed between the fallback's two renames
    io._exchange = lambda a, b: False
    real_replace, calls = os.replace, []
    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            die()
        real_replace(a, b)
    io.os.replace = replace
write("new")
"""


@pytest.mark.parametrize(("point", "visible"), [("after-exchange", "new"),
                                                ("between-renames", None)])
def test_killed_directory_swap_recovers(tmp_path, point, visible):
    from appo.io import atomic_dir, remove_stale_temps

    target = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-c", _SWAP, str(target), point], env=_env())
    assert proc.returncode == -signal.SIGKILL
    if visible:  # renameat2 swapped both directories in one step: the new one is in place
        assert (target / "weights").read_text() == visible
        assert len(remove_stale_temps(tmp_path)) == 1  # the old copy, left by the kill
    with atomic_dir(target) as tmp:  # the rerun: recovers, cleans up, then writes
        assert (target / "weights").read_text() in ("old", "new")
        (tmp / "weights").write_text("rerun")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "weights").read_text() == "rerun"


def test_rl_start_deletes_stale_checkpoint_temporaries(finished_rl, no_mlflow):
    from appo.stages import rl

    out = finished_rl / "rl" / "grpo"
    stale = out / "checkpoints" / ".step-3.abcd1234.tmp"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"x" * 1000)
    (out / ".metrics.jsonl.abcd_123.tmp.jsonl").write_text("{")
    rl.run(str(finished_rl / "params.yaml"), "grpo", progress=False)
    assert not stale.exists()
    assert not list(out.glob(".*.tmp*"))


# --------------------------------------------------------------------------------------------
# 9. checkpoint and model directories follow the umask (mkdtemp alone makes them 0700)


def test_checkpoint_and_model_directories_follow_the_umask(tmp_path, tiny_policy):
    from appo.train import common

    old = os.umask(0o022)
    try:
        ckpt = common.save_training_state(tmp_path / "checkpoints" / "step-1",
                                          torch.nn.Linear(2, 2))
        model, processor = tiny_policy
        common.export_model(model, processor, tmp_path / "model")
    finally:
        os.umask(old)
    for path in (ckpt, tmp_path / "model"):
        assert path.stat().st_mode & 0o777 == 0o755, path
        for file in path.iterdir():
            assert file.stat().st_mode & 0o777 in (0o644, 0o755), file


# --------------------------------------------------------------------------------------------
# 7. every user-facing failure is one line, ``error: <what> (<key or path>)``, exit non-zero,
# found before anything is loaded or written


def _params_file(tmp_path: Path, base: Path, edit) -> Path:
    import yaml

    params = yaml.safe_load(base.read_text())
    edit(params)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _one_line_error(stage: str, params: Path, *extra: str) -> str:
    """Run a stage's main in-process; return its one-line error message."""
    import importlib

    main = importlib.import_module(f"appo.stages.{stage}").main
    with pytest.raises(SystemExit) as info:
        main(["--params", str(params), *extra])
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize(("stage", "edit", "key"), [
    ("rl", lambda p: p["rl"].update(lr=-1e-5), "(rl.lr)"),
    ("rl", lambda p: p["rl"].update(temperature=0), "(rl.temperature)"),
    ("rl", lambda p: p["rl"].update(top_p=0), "(rl.top_p)"),
    ("rl", lambda p: p["rl"]["algorithms"]["grpo"].update(perception={"k_f": 0}),
     "(rl.algorithms.grpo.perception.k_f)"),
    ("rl", lambda p: p["rl"].update(max_prompt_tokens=0), "(rl.max_prompt_tokens)"),
    ("rl", lambda p: p["rl"].update(long_prompts="truncate"), "(rl.long_prompts)"),
    ("sft", lambda p: p["sft"].update(lr=-1.0), "(sft.lr)"),
    ("data", lambda p: p["data"].update(source="bogus"), "(data.source)"),
    ("data", lambda p: p["data"]["synthetic"].update(teacher_error=1.5),
     "(data.synthetic.teacher_error)"),
    ("frames", lambda p: p["frames"].update(num_frames=7), "(frames.num_frames)"),
])
def test_bad_value_is_one_line_naming_the_key(tmp_path, micro_params, stage, edit, key):
    params = _params_file(tmp_path, micro_params("run"), edit)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    extra = ("--algo", "grpo") if stage == "rl" else ()
    message = _one_line_error(stage, params, *extra)
    assert message.endswith(key), message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # nothing written


def _broken_checkpoint(tmp_path: Path, tiny_checkpoint: Path, how: str) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    if how == "truncated weights":
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (ckpt / "processor_config.json").unlink()
    return ckpt


@pytest.mark.parametrize(("how", "what"), [("truncated weights", "model.safetensors: truncated"),
                                           ("no processor", "no processor config")])
def test_broken_model_directory_is_one_line(tmp_path, micro_params, tiny_checkpoint, how, what):
    ckpt = _broken_checkpoint(tmp_path, tiny_checkpoint, how)
    params = micro_params("run", init=str(ckpt))
    message = _one_line_error("rl", params, "--algo", "grpo")
    assert what in message and str(ckpt) in message, message


def test_output_path_below_a_regular_file_is_one_line(tmp_path, micro_params):
    (tmp_path / "afile").write_text("")
    params = micro_params("run", out_dir=str(tmp_path / "afile" / "rl"))
    message = _one_line_error("rl", params, "--algo", "grpo")
    assert message.startswith(f"error: cannot write {tmp_path / 'afile'}"), message


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_full_disk_during_rl_checkpoint_is_one_line_and_rerun_completes(
        tmp_path, micro_params, monkeypatch, no_mlflow, writer):
    import safetensors
    import safetensors.torch

    params = micro_params("run", steps=3, save_every=2)
    ckpts = tmp_path / "run" / "rl" / "grpo" / "checkpoints"
    if writer == "safetensors":  # what the Rust writer raises on ENOSPC
        def full(*args, **kwargs):
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, "
                                              'kind: StorageFull, message: "No space left on '
                                              'device" })')
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        def full(obj, f, *args, **kwargs):  # torch writing to a Python file: a bare OSError
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as info:
        _rl_main(params)
    assert str(info.value.code) == f"error: cannot write {ckpts / 'step-2'}: No space left on device"
    assert not ckpts.exists() or not list(ckpts.iterdir())  # nothing torn left visible or hidden
    monkeypatch.undo()
    monkeypatch.setenv("APPO_MLFLOW", "0")
    _rl_main(params)
    assert (tmp_path / "run" / "rl" / "grpo" / "model" / "model.safetensors").is_file()


def test_full_disk_in_the_frames_stage_is_one_line(tmp_path, micro_params, monkeypatch):
    import numpy as np

    params = _params_file(tmp_path, micro_params("run"),
                          lambda p: p["frames"].update(out_dir=str(tmp_path / "frames")))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    message = _one_line_error("frames", params)
    assert message.startswith(f"error: cannot write {tmp_path / 'frames'}"), message
    assert message.endswith("No space left on device"), message


def _sigint_default() -> None:
    """The child gets SIGINT's default disposition, as a shell's foreground job does: a child
    inherits an ignored SIGINT, and in-process ``dvc repro`` (earlier tests) ignores it while
    its stage runs, so without this the signal could be lost and the test pass or fail by
    test order."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_without_traceback(tmp_path, micro_params):
    params = micro_params("run", steps=200)
    metrics = tmp_path / "run" / "rl" / "grpo" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "appo.stages.rl", "--algo", "grpo",
                             "--params", str(params)], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)
    deadline = time.time() + 600  # generous: a niced test on a loaded machine crawls
    while not (metrics.is_file() and metrics.read_text()) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted"), err


# --------------------------------------------------------------------------------------------
# 8. rl.max_prompt_tokens: a very long question is dropped with a warning, or stops the run


@pytest.mark.parametrize("action", ["drop", "error"])
def test_overlong_prompt_is_dropped_or_fails(tmp_path, micro_params, synthetic_data, capsys,
                                             no_mlflow, action):
    from appo.stages import rl

    data_dir = synthetic_data[0]
    rows = json.loads((data_dir / "rl.json").read_text())
    for row in rows:
        row["path"] = str((data_dir / row["path"]).resolve())
    rows[3]["problem"] = "Which colour flashed? " * 500  # ~10,000 characters
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rl.json").write_text(json.dumps(rows))
    params = _params_file(tmp_path, micro_params("run", steps=1, long_prompts=action),
                          lambda p: p["data"].update(out_dir=str(tmp_path / "data")))
    if action == "error":
        message = _one_line_error("rl", params, "--algo", "grpo")
        assert message.startswith(f"error: question {rows[3]['problem_id']} has a "), message
        assert message.endswith("over the limit of 1024 (rl.max_prompt_tokens)"), message
        return
    rl.main(["--algo", "grpo", "--params", str(params)])
    err = capsys.readouterr().err
    assert f"warning: dropped 1 of {len(rows)} rl questions" in err
    assert rows[3]["problem_id"] in err


# --------------------------------------------------------------------------------------------
# 2. `python -m appo run --set`: the run happens in its own workspace (appo/workspace.py), so
# no kill can leave the user's params.yaml rewritten; its dvc and stages die with it


def test_killed_override_run_leaves_params_yaml_untouched_and_reruns(tmp_path):
    from dvc.repo import Repo

    from appo.workspace import run_workspace

    original = "# my comment\n" + (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    Repo.init(str(tmp_path), no_scm=True).close()
    code = ("import os, signal, sys; from appo.workspace import run_workspace\n"
            "with run_workspace(sys.argv[1], 'params.yaml', ['rl.steps=3']):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=_env())
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "params.yaml").read_text() == original  # never touched
    # the killed run's workspace lock died with it: the same command runs again
    with run_workspace(tmp_path, "params.yaml", ["rl.steps=3"]) as ws:
        assert "steps: 3" in (ws / "params.yaml").read_text()
    assert (tmp_path / "params.yaml").read_text() == original


_RUNNER = """
import os, subprocess, sys
from appo.pipeline import stage_env
child = ("import time; from appo.stages import stage_main\\n"
         "stage_main(lambda argv: time.sleep(120))([])")
proc = subprocess.Popen([sys.executable, "-c", child], env=stage_env())
print(proc.pid, flush=True)
proc.wait()
"""


def test_stage_stops_when_its_runner_is_killed(tmp_path):
    from appo.pipeline import alive

    runner = subprocess.Popen([sys.executable, "-c", _RUNNER], env=_env(), cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    child = int(runner.stdout.readline())
    time.sleep(3)  # the child imports and starts watching
    assert alive(child)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    deadline = time.time() + 60
    while alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(child), "the stage outlived the killed runner"
