"""The GPU check: every GPU measurement of this repository in one call of at most 8 minutes.

Runs on a bare GPU machine that has Python, torch, transformers, accelerate, peft, pandas and
pytest but no network and none of dvc / mlflow / prefect / decord / av: every model is a
random-init Qwen2.5-VL built in memory, every video a seeded random uint8 array, and each part
runs with those packages blocked from import (so the dry run proves the check needs none of
them). Parts, each in its own subprocess (own process group) under its own time limit, so a
slow or crashing part cannot eat the others; the whole stays within ``--budget`` seconds:

* ``cuda_tests``: the tests marked ``gpu`` (``pytest -m gpu``; videos written and read as
  arrays when av / decord are absent: decoding is not what they test);
* ``rollout_3b`` / ``rollout_7b``: ``benchmarks/rollout.py`` at the Qwen2.5-VL-3B / -7B
  shapes, our engine with the dynamic cache vs the static cache + compiled step (ms per step
  against the weights-bandwidth bound, compile seconds);
* ``rl_step``: ``benchmarks/rl_step.py`` for GRPO / DAPO / APPO at a real shape (``gpu-1b``:
  ~2.2 B parameters, 16 frames of 448x448, bf16, gradient checkpointing), with the APPO/DAPO
  step-time and peak-memory ratios;
* ``rl_run``: ``benchmarks/rl_run.py``, a short RL run through the RL stage at that shape: a
  few steps, training-state checkpoints, a simulated crash, the resume, the model export.

Writes ``gpu_check.json`` (device, versions, every part's command, shape, status, seconds and
full result) and ``gpu_check.md`` (the same as tables) into the output folder, plus
``gpu_check.log`` (every part's output). Exit status 0 when every part passed.

    python benchmarks/gpu_check.py results/gpu          # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --dry-run /tmp/out   # the same parts on CPU, tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.machinery
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Absent on the bare GPU machine: every part runs with these blocked from import.
ABSENT = ("dvc", "mlflow", "prefect", "decord", "av")
VERSIONED = ("torch", "transformers", "accelerate", "peft", "pandas", "numpy", "pytest")


@dataclasses.dataclass
class Part:
    name: str
    what: str
    kind: str  # "pytest" or a script of benchmarks/
    args: list[str]
    limit_s: float
    shape: dict[str, Any]


def parts(dry_run: bool) -> list[Part]:
    """The parts in run order; ``dry_run``: the same scripts on CPU with the tiny model."""
    gpu_test_files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                            if "mark.gpu" in p.read_text())
    tests = Part("cuda_tests", "tests marked gpu (pytest -m gpu)", "pytest",
                 ["-q", "-p", "no:cacheprovider", "-m", "gpu", *gpu_test_files],
                 300 if dry_run else 80, {"files": gpu_test_files})
    if dry_run:
        small = ["--device", "cpu", "--threads", "1"]
        rollout = ["--generations", "2", "--max-new-tokens", "4", "--frames", "4",
                   "--frame-size", "56", "--reps", "1", "--bandwidth-gbs", "10", *small]
        return [
            tests,
            Part("rl_step", "RL step, GRPO / DAPO / APPO", "rl_step.py",
                 ["--model", "tiny", "--reps", "1", "--warmup", "0", "--prompts", "1",
                  "--generations", "2", "--max-new-tokens", "6", "--no-authors",
                  "--gradient-checkpointing", "on", *small], 300,
                 {"model": "tiny", "P": 1, "G": 2, "max_new_tokens": 6, "frames": 8,
                  "frame_size": 56, "dtype": "float32", "gradient_checkpointing": True}),
            # inductor compiles the static step on CPU (a minute on a busy 2-core machine):
            # once, in the 3B stand-in; the 7B stand-in runs the dynamic cache only
            Part("rollout_3b", "rollout engine at the 3B shape (dry run: tiny)", "rollout.py",
                 ["--model", "tiny", "--variants", "dynamic,static", *rollout], 300,
                 {"model": "tiny", "P": 1, "G": 2, "max_new_tokens": 4, "frames": 4,
                  "frame_size": 56, "dtype": "float32"}),
            Part("rollout_7b", "rollout engine at the 7B shape (dry run: tiny, dynamic only)",
                 "rollout.py", ["--model", "tiny", "--variants", "dynamic", *rollout], 300,
                 {"model": "tiny", "P": 1, "G": 2, "max_new_tokens": 4, "frames": 4,
                  "frame_size": 56, "dtype": "float32"}),
            Part("rl_run", "short RL run: steps, checkpoints, crash, resume, export",
                 "rl_run.py", ["--model", "tiny", "--steps", "2", "--crash-at", "1",
                               "--prompts", "1", "--generations", "2", "--max-new-tokens",
                               "6", *small], 300,
                 {"model": "tiny", "P": 1, "G": 2, "max_new_tokens": 6, "frames": 8,
                  "frame_size": 56, "steps": 2, "crash_at": 1, "dtype": "float32"}),
        ]
    gpu = ["--device", "cuda"]
    rollout = ["--prompts", "1", "--generations", "8", "--max-new-tokens", "128", "--frames",
               "16", "--frame-size", "224", "--variants", "dynamic,static", "--reps", "2", *gpu]
    rollout_shape = {"P": 1, "G": 8, "max_new_tokens": 128, "frames": 16, "frame_size": 224,
                     "video_tokens": 512, "dtype": "bfloat16"}
    return [
        tests,
        Part("rl_step", "RL step, GRPO / DAPO / APPO (real shape)", "rl_step.py",
             ["--model", "gpu-1b", "--reps", "2", "--warmup", "1", "--no-authors", *gpu], 130,
             {"model": "gpu-1b", "P": 2, "G": 8, "max_new_tokens": 256, "frames": 16,
              "frame_size": 448, "video_tokens": 2048, "dtype": "bfloat16",
              "gradient_checkpointing": True}),
        Part("rollout_3b", "rollout engine, Qwen2.5-VL-3B shape", "rollout.py",
             ["--model", "3b", *rollout], 90, {"model": "3b", **rollout_shape}),
        Part("rollout_7b", "rollout engine, Qwen2.5-VL-7B shape", "rollout.py",
             ["--model", "7b", *rollout], 100, {"model": "7b", **rollout_shape}),
        Part("rl_run", "short RL run: steps, checkpoints, crash, resume, export", "rl_run.py",
             ["--model", "gpu-1b", "--steps", "3", "--crash-at", "2", "--prompts", "2",
              "--generations", "4", "--max-new-tokens", "64", "--rollout-cache", "dynamic",
              *gpu], 80,
             {"model": "gpu-1b", "P": 2, "G": 4, "max_new_tokens": 64, "frames": 16,
              "frame_size": 448, "steps": 3, "crash_at": 2, "dtype": "bfloat16",
              "gradient_checkpointing": True, "rollout_cache": "dynamic"}),
    ]


# --------------------------------------------------------------------------------------------
# Child side: one part, with the absent packages blocked
# --------------------------------------------------------------------------------------------


class _Absent(importlib.machinery.PathFinder):
    """The path finder, blind to the packages absent on the bare GPU machine: they neither
    import nor show up as installed (``find_spec`` None, no distribution metadata), which is
    what libraries that probe for them (accelerate looks for mlflow) see there."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        for dist in super().find_distributions(*args, **kwargs):
            name = (dist.metadata["Name"] or "").lower().replace("_", "-")
            if name.partition("-")[0] not in ABSENT:
                yield dist


def _child(kind: str, argv: list[str]) -> int:
    sys.meta_path[:] = [_Absent if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
    for name in [m for m in sys.modules if m.partition(".")[0] in ABSENT]:
        del sys.modules[name]
    sys.path[:0] = [str(REPO), str(HERE)]
    print(f"gpu_check child: blocked from import: {', '.join(ABSENT)}", flush=True)
    if kind == "pytest":
        import media_shim
        import pytest

        media_shim.install()  # no av / decord: videos are written and read as arrays
        return int(pytest.main(argv))
    import runpy

    sys.argv = [str(HERE / kind), *argv]
    runpy.run_path(str(HERE / kind), run_name="__main__")
    return 0


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED + ABSENT:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(),
                            "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    count=torch.cuda.device_count())
    else:
        info["name"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def _run_part(part: Part, limit: float, scratch: Path, log) -> dict[str, Any]:
    """Run one part in its own process group; kill the whole group at ``limit`` seconds."""
    out_json = scratch / f"{part.name}.json"
    args = list(part.args)
    if part.kind == "pytest":
        args += [f"--junitxml={scratch / (part.name + '.xml')}"]
    else:
        args += ["--json", str(out_json)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part.kind, *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", APPO_MLFLOW="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    text_log = scratch / f"{part.name}.log"
    t0 = time.perf_counter()
    status = "ok"
    with open(text_log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
        finally:  # the whole group: compile workers, data-loader processes, ...
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    seconds = time.perf_counter() - t0
    if status == "ok" and rc != 0:
        status = "failed"
    output = text_log.read_text(errors="replace")
    log.write(f"\n===== {part.name} ({status}, rc {rc}, {seconds:.1f} s) =====\n$ "
              + " ".join(cmd) + "\n" + output)
    log.flush()
    record: dict[str, Any] = {
        "what": part.what, "status": status, "returncode": rc, "seconds": round(seconds, 1),
        "limit_s": round(limit, 1), "command": cmd[2:], "shape": part.shape,
        "output_tail": output[-3000:],
    }
    if part.kind == "pytest":
        record["result"] = _junit(scratch / f"{part.name}.xml")
        if status == "failed" and rc == 5:  # no test collected: nothing is marked gpu
            record["status"] = "ok"
    elif out_json.is_file():
        record["result"] = json.loads(out_json.read_text())
    return record


def _junit(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                tests.append({"test": f"{case.get('classname')}::{case.get('name')}",
                              "outcome": outcome, "seconds": float(case.get("time", 0)),
                              "message": (node.get("message") or "")[:300]})
                break
        else:
            tests.append({"test": f"{case.get('classname')}::{case.get('name')}",
                          "outcome": outcome, "seconds": float(case.get("time", 0))})
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"tests": tests, "counts": counts}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    dev, ver = report["device"], report["versions"]
    lines = [
        f"# GPU check{' (dry run: CPU, tiny model)' if report['dry_run'] else ''}",
        "",
        f"{report['created']}; device: {dev.get('name')}"
        + (f" (compute capability {dev['capability']}, {dev['memory_gib']} GiB)"
           if dev.get("capability") else "")
        + f", torch CUDA build {dev.get('cuda')}; " + ", ".join(f"{k} {v}" for k, v in ver.items()
                                                     if k not in ABSENT)
        + "; absent (blocked from import): " + ", ".join(
            f"{k}{'' if ver.get(k) is None else ' (installed here)'}" for k in ABSENT),
        f"total {report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget",
        "",
    ]
    rows = [[name, p["what"], p["status"], f"{p['seconds']:.0f} / {p['limit_s']:.0f}",
             ", ".join(f"{k} {v}" for k, v in p["shape"].items())]
            for name, p in report["parts"].items()]
    lines += _table(("part", "what", "status", "s / limit", "shape"), rows)
    for name, p in report["parts"].items():
        lines += ["", f"## {name}: {p['what']} ({p['status']})", ""]
        res = p.get("result")
        if not res:
            lines += ["No result. Last output:", "", "```", p["output_tail"][-1500:], "```"]
            continue
        if "tests" in res:
            lines += _table(("test", "outcome", "s"), [[t["test"], t["outcome"],
                                                        f"{t['seconds']:.1f}"]
                                                       for t in res["tests"]])
            continue
        lines += [f"- {h}" for h in res.get("header", [])] + [""]
        lines += _table(res["columns"], res["table"])
        extra = res.get("ratios") or {}
        lines += [""] + [f"- {k}: {_num(v)}" for k, v in extra.items()]
        if "total_s" in res:
            lines += [f"- total {res['total_s']:.1f} s, peak {_num(res.get('peak_mib'), 0)} MiB,"
                      f" resumed from step {res.get('resumed_from')}, {res.get('checkpoints')} "
                      f"checkpoints, model exported: {res.get('exported_model')}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for gpu_check.json, gpu_check.md, gpu_check.log")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same parts on CPU with the tiny model (what CI runs)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all parts together (default 480 = 8 min; dry run "
                        "1800: a busy 2-core CPU)")
    parser.add_argument("--parts", default=None, help="comma-separated subset of the parts")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 1800.0 if args.dry_run else 480.0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = parts(args.dry_run)
    if args.parts:
        keep = {p.strip() for p in args.parts.split(",")}
        unknown = keep - {p.name for p in chosen}
        if unknown:
            parser.error(f"--parts: unknown {sorted(unknown)}")
        chosen = [p for p in chosen if p.name in keep]
    device = _device()
    if not args.dry_run and not device["cuda_available"]:
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    report: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run, "device": device, "versions": _versions(),
        "budget_s": args.budget, "parts": {},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch, \
            open(out / "gpu_check.log", "w") as log:
        for part in chosen:
            left = args.budget - (time.perf_counter() - t0)
            if left < 5:
                report["parts"][part.name] = {
                    "what": part.what, "status": "skipped", "returncode": None, "seconds": 0.0,
                    "limit_s": 0.0, "command": part.args, "shape": part.shape,
                    "output_tail": "skipped: the total budget was spent"}
                continue
            print(f"gpu_check: {part.name} (limit {min(part.limit_s, left):.0f} s) ...",
                  flush=True)
            record = _run_part(part, min(part.limit_s, left), Path(scratch), log)
            report["parts"][part.name] = record
            print(f"gpu_check: {part.name}: {record['status']} in {record['seconds']:.0f} s",
                  flush=True)
            report["total_s"] = time.perf_counter() - t0
            _write(report, out)  # after every part: a killed check keeps what it measured
    report["total_s"] = time.perf_counter() - t0
    _write(report, out)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


def _write(report: dict[str, Any], out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
