"""Read the normalised splits written by the data stage."""

from __future__ import annotations

from pathlib import Path

from appo.data.formats import load_annotations
from appo.data.schema import DataError, VideoQA


def split_files(data_dir: str | Path) -> list[Path]:
    files = sorted(p for p in Path(data_dir).glob("*.json") if p.name != "summary.json")
    if not files:
        raise DataError(f"{data_dir}: no split files (*.json); run the data stage first")
    return files


def load_split(path: str | Path) -> list[VideoQA]:
    """All questions of one split file (relative video paths resolve against its folder)."""
    records, _ = load_annotations(path, check_files=False)
    return records


def split_path(data_dir: str | Path, split: str) -> Path:
    path = Path(data_dir) / f"{split}.json"
    if not path.is_file():
        raise DataError(f"{path}: split '{split}' not found; run the data stage first")
    return path
