"""Reads the official BABILong release (``RMT-team/babilong`` layout) into :class:`Sample`.

The release has one config per context length (``"0k"``, ``"1k"``, ... ``"128k"``) and one
split per task (``"qa1"`` ...); each row has ``input`` (the context), ``question`` and
``target``. A local copy is read from ``<root>/<length>/<task>.json`` (a JSON list of
rows), ``<task>.jsonl`` (one row per line) or ``<task>*.parquet`` (needs ``pyarrow``).
A hub id is handed to ``datasets.load_dataset`` when that package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from .generator import Sample, format_length, parse_length
from .vocab import check_task

_FIELDS = ("input", "question", "target")


def _length_names(length: int | str) -> list[str]:
    names = []
    if isinstance(length, str):
        names.append(length.strip())
    n = parse_length(length)
    names += [format_length(n), format_length(n).lower(), str(n)]
    return list(dict.fromkeys(names))


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        if importlib.util.find_spec("pyarrow") is None:
            raise RuntimeError(f"reading {path} needs pyarrow, which is not installed")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    return data


def _find_file(root: Path, task: str, length: int | str) -> Path:
    tried = []
    for name in _length_names(length):
        folder = root / name
        for candidate in (folder / f"{task}.json", folder / f"{task}.jsonl"):
            tried.append(candidate)
            if candidate.is_file():
                return candidate
        tried.append(folder / f"{task}*.parquet")
        parquet = sorted(folder.glob(f"{task}.parquet")) + sorted(folder.glob(f"{task}-*.parquet"))
        if parquet:
            return parquet[0]
    looked = ", ".join(map(str, tried))
    raise FileNotFoundError(f"no BABILong file for {task} at length {length!r}; looked for: {looked}")


def _to_samples(rows: list[dict[str, Any]], task: str, length: int, where: str) -> list[Sample]:
    out = []
    for i, row in enumerate(rows):
        missing = [f for f in _FIELDS if f not in row]
        if missing:
            raise ValueError(f"{where}: row {i} lacks field(s) {', '.join(missing)}")
        out.append(
            Sample(
                task=task,
                facts=[],
                question=str(row["question"]).strip(),
                target=str(row["target"]).strip(),
                context=str(row["input"]),
                length=length,
                seed=None,
            )
        )
    return out


def load_official(
    root_or_hub_id: str | os.PathLike[str], task: str, length: int | str, limit: int | None = None
) -> list[Sample]:
    """Loads one task at one length of the official BABILong data.

    Args:
        root_or_hub_id: A local folder laid out as ``<root>/<length>/<task>.json|.jsonl|
            .parquet``, or a hub id such as ``"RMT-team/babilong"`` (needs ``datasets``
            and whatever access the hub needs).
        task: ``"qa1"`` ... ``"qa5"``.
        length: ``"4k"``, ``4096``, ``"0k"`` ...; folder names are tried as given, then
            in the release's spelling (``format_length``).
        limit: Keep at most this many rows (``None``: all).

    Returns:
        Samples with ``context``, ``question``, ``target`` filled in and ``facts`` empty.

    Raises:
        ValueError: For an unknown task, a bad length or limit, or a malformed row.
        FileNotFoundError: If the folder or the task's file is missing.
        RuntimeError: If a hub id is given but ``datasets`` is not installed, or a
            parquet file is found but ``pyarrow`` is not.
    """
    task = check_task(task)
    n = parse_length(length)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    source = os.fspath(root_or_hub_id)
    root = Path(source).expanduser()
    if root.is_dir():
        path = _find_file(root, task, length)
        rows = _read_rows(path)
        where = str(path)
    elif _looks_like_hub_id(source):
        if importlib.util.find_spec("datasets") is None:
            raise RuntimeError(
                f"{source!r} is not a local folder and the 'datasets' package is not installed, "
                "so it cannot be read from the hub; download the release and pass its folder"
            )
        import datasets

        rows = list(datasets.load_dataset(source, format_length(n), split=task))
        where = f"{source}:{format_length(n)}/{task}"
    else:
        raise FileNotFoundError(f"BABILong data folder not found: {root}")
    if limit is not None:
        rows = rows[:limit]
    return _to_samples(rows, task, n, where)
