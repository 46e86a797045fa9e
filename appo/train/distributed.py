"""Data parallelism on accelerate: who does which groups, and how results meet again.

The RL trainer runs unchanged in one process or in N (``accelerate launch``, DDP/FSDP): each
process samples and trains its own whole groups (a group never straddles two processes, so
group-relative advantages and APPO's intra-group weights stay exact), gradients are averaged by
the wrapper, and scalars are combined here. Every helper is the identity when ``accelerator``
is None or has a single process, so single-process code pays nothing for it.

:func:`relaunch` turns ``python -m appo.stages.rl ...`` into ``accelerate launch --config_file
configs/accelerate/<name>.yaml -m appo.stages.rl ...`` when ``rl.launch`` names a config.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

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


def relaunch(launch: str, num_processes: int, module: str, argv: Iterable[str]) -> int | None:
    """Re-run ``python -m module argv`` under ``accelerate launch`` and return its exit code;
    None when there is nothing to do (``launch`` is none, or this is already a launched child).

    ``num_processes`` 0 takes the config's value.
    """
    if launch == "none" or os.environ.get(LAUNCHED_ENV):
        return None
    config = resolve_launch_config(launch)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if num_processes > 0:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["-m", module, *argv]
    print("launching:", " ".join(cmd[2:]), flush=True)
    env = {**os.environ, LAUNCHED_ENV: "1"}
    return subprocess.run(cmd, env=env).returncode
