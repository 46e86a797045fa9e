"""Data-parallel RL on accelerate: sharding rules, metric combination, launch configs, and the
2-process (CPU, gloo) update equal to the single-process update of the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from appo.train import distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def test_local_count_splits_whole_groups_evenly():
    assert dist.local_count(8, 2, "rl.prompts_per_step") == 4
    assert dist.local_count(3, 1, "x") == 3
    with pytest.raises(ValueError, match="rl.prompts_per_step=3 is not divisible by the 2"):
        dist.local_count(3, 2, "rl.prompts_per_step")


def test_merge_metrics_sums_totals_and_averages_the_rest():
    parts = [{"reward": 0.5, "groups_kept": 2.0, "rollout_tokens_per_s": 100.0,
              "appo/perception_hit_rate": 0.25},
             {"reward": 0.0, "groups_kept": 1.0, "rollout_tokens_per_s": 50.0}]
    merged = dist.merge_metrics(parts)
    assert merged == {"reward": 0.25, "groups_kept": 3.0, "rollout_tokens_per_s": 150.0,
                      "appo/perception_hit_rate": 0.25}  # reported by one process only
    assert dist.combine_metrics({"a": 1.0}, None) == {"a": 1.0}


def test_single_process_helpers_are_identities():
    assert dist.rank_and_world(None) == (0, 1)
    assert dist.max_across(3, None) == 3
    assert dist.all_true(False, None) is False
    seeds = {dist.step_seed(0, s, r) for s in range(3) for r in range(2)}
    assert len(seeds) == 6  # every (step, process) samples with its own seed


def test_launch_configs_resolve_and_bad_names_fail_clearly(tmp_path, monkeypatch):
    for name in ("ddp", "fsdp", "cpu-ddp"):
        cfg = yaml.safe_load(dist.resolve_launch_config(name).read_text())
        assert cfg["num_machines"] == 1 and cfg["num_processes"] >= 2
    nodes = yaml.safe_load(dist.resolve_launch_config("multi-node").read_text())
    assert nodes["num_machines"] == 2 and nodes["num_processes"] % nodes["num_machines"] == 0
    assert yaml.safe_load(dist.resolve_launch_config("fsdp").read_text())[
        "fsdp_config"]["fsdp_version"] == 2
    with pytest.raises(ValueError, match="rl.launch: 'deepspeed' is not 'none'.*cpu-ddp"):
        dist.resolve_launch_config("deepspeed")
    with pytest.raises(FileNotFoundError, match="rl.launch: accelerate config .*nope.yaml"):
        dist.resolve_launch_config(str(tmp_path / "nope.yaml"))
    assert dist.relaunch("none", 0, "appo.stages.rl", []) is None
    monkeypatch.setenv(dist.LAUNCHED_ENV, "1")  # inside a launch: never relaunch again
    assert dist.relaunch("cpu-ddp", 0, "appo.stages.rl", []) is None


def test_indivisible_prompts_per_step_is_refused(tiny_policy, synthetic_data):
    from types import SimpleNamespace

    from appo.config import RLConfig
    from appo.rl.trainer import RLTrainer

    model, processor = tiny_policy
    _, store, records = synthetic_data
    cfg = RLConfig(prompts_per_step=3, num_generations=2)
    two = SimpleNamespace(process_index=0, num_processes=2, device=torch.device("cpu"),
                          unwrap_model=lambda m: m)
    with pytest.raises(ValueError, match="prompts_per_step=3 is not divisible by the 2"):
        RLTrainer(model, processor, cfg, _preset("appo"), records["rl"], store,
                  accelerator=two)


def _preset(name: str):
    from appo.config import RLConfig, load_section

    return load_section(RLConfig, "rl", ROOT / "params.yaml").algorithm(name)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "APPO_MLFLOW": "0", "TOKENIZERS_PARALLELISM": "false"})
    return env


def _launch(*args: str, processes: int, machine: tuple[int, int, int] | None = None) -> list[str]:
    """The command for 1 process, N processes on this machine, or (with ``machine`` = (rank,
    machines, port)) this machine's share of a launch over several "machines" on 127.0.0.1."""
    if processes == 1:
        return [sys.executable, *args]
    where = []
    if machine is not None:
        rank, machines, port = machine
        where = ["--num_machines", str(machines), "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "cpu-ddp.yaml"),
            "--num_processes", str(processes), *where, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_machines(cmds: list[list[str]]) -> list[str]:
    """Start one launcher per "machine" at once (they rendezvous), wait for all; their output.
    Every process is killed at the end, also when one fails or hangs."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c in cmds]
    outs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-5000:]
    return outs


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_two_processes_update_like_one_on_the_same_global_batch(
        tmp_path, micro_params, tiny_policy, synthetic_data):
    """APPO (perception weights per group, 2 micro-batches per process so gradient
    accumulation runs under no_sync) on 4 groups: the 2-process DDP update over 2 + 2 groups
    equals the 1-process update over all 4, and both processes end with the same weights."""
    from safetensors.torch import load_file

    from appo.config import RLConfig, load_section
    from appo.rl.trainer import RLTrainer

    params = micro_params("dist", prompts_per_step=4, num_generations=2,
                          groups_per_micro_batch=1, max_new_tokens=8, lr=1.0)
    cfg = load_section(RLConfig, "rl", params)
    model, processor = tiny_policy
    _, store, records = synthetic_data
    trainer = RLTrainer(model, processor, cfg, cfg.algorithm("appo"), records["rl"], store)
    torch.manual_seed(0)
    batch = trainer.collect()
    n = batch.rollout.prompt_ids.shape[0]
    assert n == 8
    # a fixed, non-trivial signal (the untrained tiny model earns no reward by itself)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.0, 1.0, 0.25, -0.25])
    batch.correct = torch.tensor([True, False, True, False, False, True, True, False])
    torch.save(batch, tmp_path / "batch.pt")
    script = str(ROOT / "tests" / "dist_update.py")
    common = ["--params", str(params), "--algo", "appo", "--batch", str(tmp_path / "batch.pt")]
    _run(_launch(script, *common, "--out", str(tmp_path / "one"), processes=1))
    _run(_launch(script, *common, "--out", str(tmp_path / "two"), processes=2))

    one = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    two = [load_file(str(tmp_path / "two" / f"rank{r}.safetensors")) for r in (0, 1)]
    start = {n: p.detach() for n, p in model.named_parameters() if n in one}
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-4  # the update did something
    for k in one:
        assert torch.equal(two[0][k], two[1][k]), k  # replicas stay identical
        torch.testing.assert_close(two[0][k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    assert m1["appo/weight_mean"] == pytest.approx(m2["appo/weight_mean"], rel=1e-5)

    # the same global batch over 2 "machines" x 1 process (two launchers, machine_rank 0 and
    # 1, rendezvous on 127.0.0.1 over gloo) gives the 2-process update again
    port = _free_port()
    _run_machines([_launch(script, *common, "--out", str(tmp_path / "nodes"), processes=2,
                           machine=(rank, 2, port)) for rank in (0, 1)])
    nodes = [load_file(str(tmp_path / "nodes" / f"rank{r}.safetensors")) for r in (0, 1)]
    for k in one:
        assert torch.equal(nodes[0][k], nodes[1][k]), k
        torch.testing.assert_close(nodes[0][k], one[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_rl_stage_trains_under_a_two_process_launch(micro_params):
    """``--launch cpu-ddp``: the stage relaunches itself with accelerate; one model, one
    metrics file, written by the main process."""
    params = micro_params("launch", prompts_per_step=2, num_generations=2, steps=2,
                          save_every=1)
    out = Path(yaml.safe_load(params.read_text())["rl"]["out_dir"]) / "dapo"
    _run([sys.executable, "-m", "appo.stages.rl", "--algo", "dapo", "--params", str(params),
          "--launch", "cpu-ddp"])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]  # per-step rows (the last row holds final/*)
    assert [r["step"] for r in rows] == [0, 1]  # one row per step, not one per process
    assert all(r["groups_kept"] == 2 for r in rows)  # 1 + 1 whole groups, summed
    assert (out / "model" / "config.json").is_file()


@pytest.mark.slow
def test_rl_stage_trains_across_two_machines(micro_params):
    """The same stage command on two "machines" (127.0.0.1, ``--machine-rank`` 0 and 1, gloo):
    one data-parallel run of 2 processes; machine 0 writes the outputs, machine 1 takes no lock
    (on a cluster each machine has its own disk or they share one)."""
    params = micro_params("machines", prompts_per_step=2, num_generations=2, steps=2)
    out = Path(yaml.safe_load(params.read_text())["rl"]["out_dir"]) / "dapo"
    port = _free_port()
    outs = _run_machines([[sys.executable, "-m", "appo.stages.rl", "--algo", "dapo", "--params",
                           str(params), "--launch", "cpu-ddp", "--num-machines", "2",
                           "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1",
                           "--main-process-port", str(port)] for rank in (0, 1)])
    assert "--machine_rank 1" in outs[1] and "--num_machines 2" in outs[0]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [0, 1]  # written once, by machine 0
    assert (out / "model" / "config.json").is_file()


def test_machines_come_from_flags_then_environment_and_are_checked():
    from appo.train.distributed import Machines

    assert Machines.from_args(env={}) == Machines()  # one machine
    assert Machines().launch_args() == []
    env = {"APPO_NUM_MACHINES": "2", "APPO_MACHINE_RANK": "1", "APPO_MAIN_PROCESS_IP": "10.0.0.1"}
    m = Machines.from_args(env=env)
    assert (m.num_machines, m.machine_rank, m.main_process_ip, m.main_process_port) == \
        (2, 1, "10.0.0.1", 29500)
    assert not m.is_main_machine
    assert m.launch_args() == ["--num_machines", "2", "--machine_rank", "1",
                               "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"]
    assert Machines.from_args(machine_rank=0, env=env).is_main_machine  # the flag wins
    with pytest.raises(ValueError, match="--machine-rank must be in \\[0, 1\\]"):
        Machines.from_args(machine_rank=2, env=env)
    with pytest.raises(ValueError, match="--main-process-ip"):
        Machines(num_machines=2)
    with pytest.raises(ValueError, match="APPO_MACHINE_RANK='x' is not a valid int"):
        Machines.from_args(env={"APPO_MACHINE_RANK": "x"})


def test_more_than_one_machine_needs_a_launch_config():
    from appo.train.distributed import Machines, relaunch

    with pytest.raises(ValueError, match="rl.launch is 'none' but this is one of several"):
        relaunch("none", 0, "appo.stages.rl", [], Machines(2, 0, "127.0.0.1"))
    # the multi-node config's 2 machines are the default: machine 1 needs machine 0's address
    with pytest.raises(ValueError, match="--main-process-ip"):
        relaunch("multi-node", 0, "appo.stages.rl", [], Machines(machine_rank=1))
    assert Machines(machine_rank=1, main_process_ip="h").resolved(2).launch_args()[:4] == \
        ["--num_machines", "2", "--machine_rank", "1"]
