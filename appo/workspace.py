"""Run workspaces: a run with another params file or with overrides never touches params.yaml.

``python -m appo run --set rl.steps=10`` (and the flow, and every run of an experiment) runs in
its own copy of the project, ``outputs/runs/<name>/``: the project's source files (what git
tracks or would track, uncommitted edits included), the run's validated ``params.yaml``, and a
``.dvc/`` whose cache is the project's. DVC there restores from the shared cache every stage
whose code, params and inputs match a run it has seen (the data, the frames, the SFT warm
start), linking the files instead of copying them, and runs only what the overrides change.
The stages log to the project's MLflow store. The user's ``params.yaml``, ``dvc.lock`` and
``outputs/`` stay as they were, whatever happens to the run (a kill included), so a plain
``dvc repro`` never sees an override.

The workspace stays after the run: its ``outputs/`` hold the results, and the same overrides
later run incrementally in the same folder. Its name is readable and unique per effective
params: ``<overrides>-<hash>``. Relative input paths of the params (``data.files``,
``model.path``, the benchmarks' files and roots) are linked into it, so they resolve as in
the project. One run at a time per workspace (a lock file); runs with different overrides
run side by side.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Every section a full params file is validated against before a pipeline run uses it.
SECTIONS = {"data": "DataConfig", "frames": "FramesConfig", "model": "ModelConfig",
            "sft": "SFTConfig", "rl": "RLConfig", "eval": "EvalConfig"}
RUNS_DIR = Path("outputs") / "runs"
LINK_ABOVE = 8 << 20  # source files this large are hard-linked into a workspace, not copied
MANIFEST = ".appo-files"  # the source files copied in, so the next sync removes deleted ones
LOCK = ".appo-run.lock"
# never copied: the project's own results and state (outputs/ holds the workspaces themselves)
SKIP = ("outputs/", "metrics/", ".dvc/", ".git/", "dvc.lock", "params.yaml")
# without git: folders a walk of the project leaves out (environments, caches, data, stores)
WALK_SKIP = {".git", ".dvc", ".venv", "venv", "outputs", "data", "models", "metrics", "mlruns",
             "mlartifacts", "__pycache__", "node_modules"}


# --------------------------------------------------------------------------------------------
# params: a params file plus overrides, validated


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rl.algorithms.appo.perception.w_max=1.5"`` -> (path, 1.5); the value is YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ValueError(f"override {text!r}: expected dotted.key=value")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(params: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``params`` with each ``dotted.key=value`` set (missing mappings are created;
    :func:`validate_params` then rejects unknown keys)."""
    out = copy.deepcopy(params)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: '{part}' is not a mapping")
            node = child
        node[path[-1]] = value
    return out


def validate_params(params: dict[str, Any]) -> None:
    """Strict check of every stage section (appo.config): unknown key or wrong type -> error."""
    from appo import config

    for section, cls in SECTIONS.items():
        config.from_dict(getattr(config, cls), params.get(section) or {}, section)



# --------------------------------------------------------------------------------------------
# workspaces


def _source(project: Path, params_file: str | Path) -> Path:
    return Path(params_file) if Path(params_file).is_absolute() else project / params_file


def effective_params(project: Path, params_file: str | Path,
                     overrides: Sequence[str]) -> dict[str, Any]:
    """``params_file`` (relative to ``project``) with ``overrides`` applied, validated."""
    from appo.config import load_yaml

    params = apply_overrides(load_yaml(_source(project, params_file)), overrides)
    validate_params(params)
    return params


def needs_workspace(project: Path, params_file: str | Path, overrides: Sequence[str]) -> bool:
    """A run needs its own workspace unless it uses the project's params.yaml as it is."""
    return bool(overrides) or \
        _source(project, params_file).resolve() != (project / "params.yaml").resolve()


def workspace_name(params_file: str | Path, overrides: Sequence[str],
                   params: dict[str, Any]) -> str:
    """``rl.steps=10,eval.splits=[val]-1a2b3c4d``: the overrides (and a params file other
    than params.yaml), shortened, then a hash of the effective params, so equal params share
    a workspace and different ones never do."""
    parts = ([] if Path(params_file).name == "params.yaml" else [Path(params_file).stem])
    slug = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", ",".join([*parts, *overrides]))[:60] or "params"
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    return f"{slug}-{digest.hexdigest()[:8]}"


def workspace_path(project: str | Path, params_file: str | Path = "params.yaml",
                   overrides: Sequence[str] = ()) -> Path:
    """Where a run with these params happens: the project itself, or its workspace."""
    return _resolve(Path(project).resolve(), params_file, overrides)[0]


def _resolve(project: Path, params_file: str | Path, overrides: Sequence[str]
             ) -> tuple[Path, dict[str, Any] | None]:
    """(folder of the run, its effective params; None when that is the project itself)."""
    if not needs_workspace(project, params_file, overrides):
        return project, None
    params = effective_params(project, params_file, overrides)
    return project / RUNS_DIR / workspace_name(params_file, overrides, params), params


def source_files(project: Path) -> list[str]:
    """The project's files a run needs, relative: what git tracks or would track (so
    untracked new modules and uncommitted edits come along, ignored files do not), without
    results and state (:data:`SKIP`). Outside git: a walk without :data:`WALK_SKIP`."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=project, capture_output=True,
                             timeout=60, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
        for root, dirs, names in os.walk(project):
            dirs[:] = sorted(d for d in dirs if d not in WALK_SKIP and not d.endswith(".egg-info"))
            rel = Path(root).relative_to(project)
            files += [str(rel / n) if str(rel) != "." else n for n in sorted(names)]
    return [f for f in files if not f.startswith(SKIP) and f not in SKIP
            and (project / f).is_file()]


def input_paths(params: dict[str, Any]) -> list[str]:
    """Relative paths the params read from (annotation files, video and image roots, a model
    checkpoint): linked into a workspace so they resolve as in the project."""
    found: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, dict):
            for key in ("path", "video_root", "image_root"):
                add(value.get(key))
        elif isinstance(value, str) and value and not Path(value).is_absolute():
            found.append(value)

    for section, keys in (("data", ("video_root", "image_root")), ("model", ("path",)),
                          ("eval", ("video_root", "image_root")), ("rl", ("init",))):
        for key in keys:
            add((params.get(section) or {}).get(key))
    for section, key in (("data", "files"), ("eval", "benchmarks")):
        for value in ((params.get(section) or {}).get(key) or {}).values():
            add(value)
    return found


def _out_dirs(params: dict[str, Any]) -> list[Path]:
    """The folders the stages write (never linked: the workspace writes its own)."""
    dirs = [Path("outputs")]
    for section in ("data", "frames", "model", "sft", "rl"):
        value = (params.get(section) or {}).get("out_dir")
        if isinstance(value, str):
            dirs.append(Path(value))
    return dirs


def _write_dvc_config(project: Path, workspace: Path) -> None:
    """The workspace's ``.dvc/``: the project's config (remotes, core options) with the
    project's cache, file links instead of copies, and no git (the workspace is no repository).
    """
    from dvc.config import Config
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        cache_dir = repo.cache.local_cache_dir
    (workspace / ".dvc").mkdir(parents=True, exist_ok=True)
    source = Config(dvc_dir=str(project / ".dvc"), validate=False)
    target = Config(dvc_dir=str(workspace / ".dvc"), validate=False)
    for level in ("repo", "local"):
        conf = source.load_one(level)  # relative paths come back absolute, and are re-relativised
        with target.edit(level, validate=False) as edit:
            edit.clear()
            edit.update(conf)
    with target.edit("local", validate=False) as edit:
        edit.setdefault("core", {})["no_scm"] = True
        edit.setdefault("cache", {}).update({"dir": cache_dir, "type": "reflink,hardlink,copy"})


def sync_workspace(project: Path, workspace: Path, params: dict[str, Any], header: str) -> None:
    """Make ``workspace`` the project's source plus ``params``: copy changed files, remove
    files the project no longer has, link the params' relative inputs, write params.yaml."""
    import yaml

    from appo.io import atomic_write_text

    workspace.mkdir(parents=True, exist_ok=True)
    outs = _out_dirs(params)
    links = [path for path in map(Path, map(os.path.normpath, input_paths(params)))
             if not any(path == o or o in path.parents or path in o.parents for o in outs)]
    # inputs (a data folder beside the code, outside git) are linked, never copied
    files = [f for f in source_files(project)
             if not any(Path(f) == link or link in Path(f).parents for link in links)]
    manifest = workspace / MANIFEST
    previous = manifest.read_text().splitlines() if manifest.is_file() else []
    for stale in sorted(set(previous) - set(files)):
        (workspace / stale).unlink(missing_ok=True)
    for rel in files:
        src, dst = project / rel, workspace / rel
        size = src.stat().st_size
        if dst.is_file() and dst.stat().st_size == size and (
                os.path.samefile(src, dst) or dst.read_bytes() == src.read_bytes()):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        if size >= LINK_ABOVE:  # a large untracked file (a video, a checkpoint): no copy
            try:
                os.link(src, dst)
                continue
            except OSError:
                pass
        shutil.copy2(src, dst)
    atomic_write_text(manifest, "\n".join(files) + "\n")
    for path in links:  # not outputs of the pipeline (rl.init = outputs/sft/model): DVC's job
        link, target = workspace / path, project / path
        if target.exists() and not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
    _write_dvc_config(project, workspace)
    atomic_write_text(workspace / "params.yaml",
                      f"{header}\n{yaml.safe_dump(params, sort_keys=False)}")


@contextlib.contextmanager
def run_workspace(project: str | Path = ".", params_file: str | Path = "params.yaml",
                  overrides: Sequence[str] = ()) -> Iterator[Path]:
    """The folder a run with ``params_file`` + ``overrides`` happens in, ready and locked.

    The project itself when it runs its own params.yaml unchanged; else its workspace
    (:func:`workspace_path`), synced, with ``MLFLOW_TRACKING_URI`` pointing at the project's
    store for the duration. Params are validated before anything is written.
    """
    project = Path(project).resolve()
    workspace, params = _resolve(project, params_file, overrides)
    if params is None:
        yield project
        return
    workspace.mkdir(parents=True, exist_ok=True)
    with open(workspace / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another run with the same params is using {workspace}; "
                               "wait for it to finish") from None
        flags = " ".join([*([] if Path(params_file).name == "params.yaml"
                            else [f"--params {params_file}"]),
                          *(f"--set {o}" for o in overrides)])
        sync_workspace(project, workspace, params,
                       f"# effective params of a run with {flags} (written by appo; the "
                       f"project's own params.yaml is {project / 'params.yaml'})")
        print(f"running in {workspace.relative_to(project)} (your params.yaml and outputs/ "
              "stay as they are)", flush=True)
        from appo.mlflow_setup import tracking_uri

        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(project)
        try:
            yield workspace
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous
