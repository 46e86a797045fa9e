"""Data parallelism on accelerate: who does which groups, and how results meet again.

The RL trainer runs unchanged in one process or in N (``accelerate launch``, DDP/FSDP): each
process samples and trains its own whole groups (a group never straddles two processes, so
group-relative advantages and APPO's intra-group weights stay exact), gradients are averaged by
the wrapper, and scalars are combined here. Every helper is the identity when ``accelerator``
is None or has a single process, so single-process code pays nothing for it.

:func:`relaunch` turns ``python -m appo.stages.rl ...`` into ``accelerate launch --config_file
configs/accelerate/<name>.yaml -m appo.stages.rl ...`` when ``rl.launch`` names a config.
Across machines (:class:`Machines`) the same command runs on every machine with its own
``--machine-rank``; the processes of all machines form one data-parallel group.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from appo.config import ConfigError

# Launch configs shipped with the project (rl.launch: <name> -> configs/accelerate/<name>.yaml).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
LAUNCHED_ENV = "APPO_LAUNCHED"  # set in the children of relaunch(): never relaunch twice
SUMMED = frozenset({"groups_kept", "groups_sampled", "rollout_tokens_per_s"})  # totals, not means


def rank_and_world(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def local_count(total: int, world: int, what: str) -> int:
    """Each process's equal share of ``total`` (whole groups); uneven shares are refused."""
    if total % world:
        raise ValueError(f"{what}={total} is not divisible by the {world} processes; "
                         "every process trains the same number of whole groups")
    return total // world


def max_across(value: int, accelerator) -> int:
    """The largest ``value`` over all processes (e.g. the prompts any process still needs)."""
    return _reduce_int(value, "MAX", accelerator)


def sum_across(value: int, accelerator) -> int:
    """The total of ``value`` over all processes (e.g. the valid tokens of the global batch)."""
    return _reduce_int(value, "SUM", accelerator)


def all_true(flag: bool, accelerator) -> bool:
    """True only if ``flag`` holds on every process (e.g. every local loss is finite)."""
    return bool(_reduce_int(int(bool(flag)), "MIN", accelerator))


def _reduce_int(value: int, op: str, accelerator) -> int:
    if rank_and_world(accelerator)[1] == 1:
        return value
    t = torch.tensor([value], device=accelerator.device)
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return int(t.item())


def combine_metrics(metrics: Mapping[str, float], accelerator) -> dict[str, float]:
    """Per-step scalars of all processes: totals for :data:`SUMMED` keys, means for the rest
    (a key only some processes report is averaged over those)."""
    if rank_and_world(accelerator)[1] == 1:
        return dict(metrics)
    from accelerate.utils import gather_object

    return merge_metrics(gather_object([dict(metrics)]))


def merge_metrics(parts: list[Mapping[str, float]]) -> dict[str, float]:
    """The per-process metric dicts as one (see :func:`combine_metrics`)."""
    out = {}
    for k in dict.fromkeys(k for p in parts for k in p):
        values = [p[k] for p in parts if k in p]
        out[k] = float(sum(values)) if k in SUMMED else float(sum(values) / len(values))
    return out


def no_sync(policy, accelerator, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if last or rank_and_world(accelerator)[1] == 1:
        return contextlib.nullcontext()
    return accelerator.no_sync(policy)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Torch seed of (run seed, step, process): sampling is reproducible on resume without RNG
    checkpoints, and processes draw different samples."""
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63 - 1)


def resolve_launch_config(name: str) -> Path:
    """``rl.launch`` value -> an accelerate config file (a shipped name or a path)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"rl.launch: accelerate config {path} does not exist")
        return path
    shipped = CONFIG_DIR / f"{name}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"rl.launch: '{name}' is not 'none', a shipped config "
                         f"({', '.join(names)}) or a path to an accelerate config .yaml")
    return shipped


@dataclass(frozen=True)
class Machines:
    """Where this machine sits in a multi-machine launch (one machine: the defaults).

    Per machine, not per pipeline (every machine runs the same params), so these come from the
    command line or the environment (``APPO_NUM_MACHINES``, ``APPO_MACHINE_RANK``,
    ``APPO_MAIN_PROCESS_IP``, ``APPO_MAIN_PROCESS_PORT``: set once per machine, they also reach
    the stage under ``dvc repro``), never from params.yaml. ``num_machines`` 0 takes the launch
    config's value; ``num_processes`` of the launch is the total over all machines, as in
    accelerate.
    """

    num_machines: int = 0
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500

    def __post_init__(self) -> None:
        if self.num_machines < 0:
            raise ConfigError(f"--num-machines must be >= 1 (0: the launch config's), got "
                              f"{self.num_machines}")
        if self.machine_rank < 0:
            raise ConfigError(f"--machine-rank must be >= 0, got {self.machine_rank}")
        if self.num_machines and self.machine_rank >= self.num_machines:
            raise ConfigError(f"--machine-rank must be in [0, {self.num_machines - 1}] for "
                              f"{self.num_machines} machines, got {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ConfigError("--main-process-ip (or APPO_MAIN_PROCESS_IP) is required with "
                              "more than one machine: the address of machine 0")

    @property
    def is_main_machine(self) -> bool:
        """Machine 0 holds the main process: it writes the outputs and holds their lock."""
        return self.machine_rank == 0

    @classmethod
    def from_args(cls, num_machines: int | None = None, machine_rank: int | None = None,
                  main_process_ip: str | None = None, main_process_port: int | None = None,
                  env: Mapping[str, str] | None = None) -> Machines:
        """Flags first, then the ``APPO_*`` environment variables, then the defaults."""
        env = os.environ if env is None else env

        def pick(flag, name: str, default, cast):
            if flag is not None:
                return flag
            value = env.get(f"APPO_{name}")
            if value in (None, ""):
                return default
            try:
                return cast(value)
            except ValueError:
                raise ConfigError(f"APPO_{name}={value!r} is not a valid {cast.__name__}") \
                    from None

        return cls(pick(num_machines, "NUM_MACHINES", 0, int),
                   pick(machine_rank, "MACHINE_RANK", 0, int),
                   pick(main_process_ip, "MAIN_PROCESS_IP", None, str),
                   pick(main_process_port, "MAIN_PROCESS_PORT", 29500, int))

    def resolved(self, config_machines: int) -> Machines:
        """With the launch config's machine count filled in (and checked again)."""
        return Machines(self.num_machines or config_machines, self.machine_rank,
                        self.main_process_ip, self.main_process_port)

    def launch_args(self) -> list[str]:
        """``accelerate launch`` flags (none for one machine: the config decides)."""
        if self.num_machines <= 1:
            return []
        return ["--num_machines", str(self.num_machines), "--machine_rank",
                str(self.machine_rank), "--main_process_ip", str(self.main_process_ip),
                "--main_process_port", str(self.main_process_port)]


def relaunch(launch: str, num_processes: int, module: str, argv: Iterable[str],
             machines: Machines | None = None) -> int | None:
    """Re-run ``python -m module argv`` under ``accelerate launch`` and return its exit code;
    None when there is nothing to do (``launch`` is none, or this is already a launched child).

    ``num_processes`` 0 takes the config's value (the total over all machines).
    """
    machines = machines or Machines()
    if os.environ.get(LAUNCHED_ENV):
        return None
    if launch == "none":
        if machines.num_machines > 1 or machines.machine_rank > 0:
            raise ConfigError("rl.launch is 'none' but this is one of several machines: name a "
                              "launch config (e.g. --launch multi-node) to run across machines")
        return None
    config = resolve_launch_config(launch)
    machines = machines.resolved(int((yaml.safe_load(config.read_text()) or {})
                                     .get("num_machines") or 1))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if num_processes > 0:
        cmd += ["--num_processes", str(num_processes)]
    cmd += [*machines.launch_args(), "-m", module, *argv]
    print("launching:", " ".join(cmd[2:]), flush=True)
    env = {**os.environ, LAUNCHED_ENV: "1"}
    return subprocess.run(cmd, env=env).returncode
