"""Readers for JSONL, CSV/TSV, Parquet and Hugging Face datasets; split and mix helpers."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deltatune.core.errors import DataError

Row = dict[str, Any]


class Rows(list):
    """A list of row dicts that knows its source and each row's line (1-based) there."""

    def __init__(self, rows: Iterable[Row] = (), source: str = "data",
                 lines: Sequence[int] | None = None, unit: str = "line") -> None:
        super().__init__(rows)
        self.source = source
        self.lines = list(lines) if lines is not None else None
        self.unit = unit

    def where(self, index: int) -> str:
        """Return 'SOURCE line N' (or 'row N') for the row at ``index`` (0-based)."""
        if self.lines is not None and index < len(self.lines):
            return f"{self.source} {self.unit} {self.lines[index]}"
        return f"{self.source} row {index + 1}"

    def subset(self, indices: Sequence[int]) -> Rows:
        """Return the rows at ``indices`` with their locations."""
        lines = [self.lines[i] for i in indices] if self.lines is not None else None
        return Rows([self[i] for i in indices], self.source, lines, self.unit)


def read_jsonl(path: str | Path) -> Rows:
    """Read a JSON-lines file (one object per line; blank lines skipped)."""
    path = _existing(path)
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n}: not valid JSON ({exc.msg} at column "
                                f"{exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {n}: expected a JSON object, got "
                                f"{type(obj).__name__}")
            rows.append(obj)
            lines.append(n)
    return _nonempty(Rows(rows, str(path), lines))


def read_csv(path: str | Path, *, delimiter: str | None = None) -> Rows:
    """Read a CSV (or TSV, by extension) file with a header row; values stay strings."""
    path = _existing(path)
    delimiter = delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    rows, lines = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{path}: the file is empty (no header row)")
        try:
            for row in reader:
                if None in row:
                    n_fields = len(reader.fieldnames) + len(row[None])
                    raise DataError(f"{path} line {reader.line_num}: {n_fields} fields, the "
                                    f"header has {len(reader.fieldnames)}")
                if all(v in (None, "") for v in row.values()):
                    continue
                rows.append(dict(row))
                lines.append(reader.line_num)
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
    return _nonempty(Rows(rows, str(path), lines))


def read_parquet(path: str | Path) -> Rows:
    """Read a Parquet file (needs ``pyarrow``); row numbers are 1-based record indices."""
    path = _existing(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; install it with: "
                        f"pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several error types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    rows = table.to_pylist()
    return _nonempty(Rows(rows, str(path), list(range(1, len(rows) + 1)), unit="record"))


def from_dataset(dataset: Any, *, split: str | None = None, source: str | None = None) -> Rows:
    """Read a Hugging Face ``Dataset`` (or ``DatasetDict`` with ``split``) object."""
    if (hasattr(dataset, "keys") and not hasattr(dataset, "column_names")) or (
            isinstance(getattr(dataset, "column_names", None), dict)):
        splits = list(dataset.keys())
        if split is None or split not in splits:
            raise DataError(f"{source or 'dataset'}: a DatasetDict; choose a split with "
                            f"split=... (it has {', '.join(splits)})")
        dataset = dataset[split]
    rows = [dict(r) for r in dataset]
    label = source or f"dataset{f'[{split}]' if split else ''}"
    return _nonempty(Rows(rows, label, list(range(1, len(rows) + 1)), unit="record"))


def read_dataset_dir(path: str | Path, *, split: str | None = None) -> Rows:
    """Read a directory written by ``datasets``' ``save_to_disk`` (needs ``datasets``)."""
    path = _existing(path)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a saved Hugging Face dataset directory needs the 'datasets' "
                        f"package; install it with: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    return from_dataset(ds, split=split, source=str(path))


def read(source: Any, *, columns: Mapping[str, str] | None = None,
         split: str | None = None) -> Rows:
    """Read rows from a path (by extension / directory), a built-in data set name
    (``split``, default train) or a ``datasets`` object.

    ``columns`` renames columns (``{"question": "prompt"}``); a column named there that
    no row has is an error listing the columns that exist. Returns :class:`Rows`.
    """
    if isinstance(source, str) and not Path(source).exists() and _is_builtin(source):
        rows = read_builtin(source, split or "train")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else \
            path.suffix.lower()
        if path.is_dir():
            rows = read_dataset_dir(path, split=split)
        elif suffix in (".jsonl", ".json", ".ndjson"):
            rows = read_jsonl(path)
        elif suffix in (".jsonl.gz", ".json.gz"):
            rows = _read_jsonl_gz(path)
        elif suffix in (".csv", ".tsv", ".tab"):
            rows = read_csv(path)
        elif suffix in (".parquet", ".pq"):
            rows = read_parquet(path)
        else:
            _existing(path)
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .csv, "
                            f".tsv, .parquet or a saved dataset directory")
    elif isinstance(source, Rows):
        rows = source
    elif isinstance(source, list):
        rows = Rows(source, "rows")
    else:
        rows = from_dataset(source, split=split)
    return rename_columns(rows, columns) if columns else rows


def _is_builtin(name: str) -> bool:
    from deltatune.datasets import list_datasets

    return name in {spec.name for spec in list_datasets()}


def read_builtin(name: str, split: str = "train") -> Rows:
    """Rows of a built-in data set (``deltatune.datasets``), built on first use."""
    from deltatune import datasets

    return _nonempty(Rows(datasets.load(name, split), f"{name}[{split}]", unit="row"))


def _read_jsonl_gz(path: Path) -> Rows:
    import gzip
    import tempfile

    with gzip.open(path, "rb") as f, tempfile.NamedTemporaryFile(suffix=".jsonl") as tmp:
        tmp.write(f.read())
        tmp.flush()
        rows = read_jsonl(tmp.name)
    rows.source = str(path)
    return rows


def rename_columns(rows: Rows, columns: Mapping[str, str]) -> Rows:
    """Return rows with columns renamed ``{old: new}``; unknown ``old`` is an error."""
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    for old in columns:
        if old not in present:
            raise DataError(f"{rows.source}: column {old!r} (in the column mapping) is not in "
                            f"the data; columns: {', '.join(sorted(present))}")
    renamed = [{columns.get(k, k): v for k, v in r.items()} for r in rows]
    return Rows(renamed, rows.source, rows.lines, rows.unit)


def split(rows: Rows, *, validation: float = 0.1, seed: int = 0) -> tuple[Rows, Rows]:
    """Split rows into (train, validation) by a seeded shuffle; both keep row locations."""
    if not 0.0 < validation < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {validation}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(validation * len(rows)))
    if n_val >= len(rows):
        raise DataError(f"{rows.source}: {len(rows)} rows are too few to hold out "
                        f"{validation:.0%} for validation")
    return rows.subset(sorted(order[n_val:])), rows.subset(sorted(order[:n_val]))


def mix(task_examples: Sequence[Any], general_examples: Sequence[Any], ratio: float, *,
        seed: int = 0) -> list[Any]:
    """Mix general examples into task examples so they make up ``ratio`` of the result.

    Forgetting guard (seed 002): ``n_general = round(ratio / (1 - ratio) * n_task)``
    general examples are drawn without replacement while they last (cycled in a seeded
    order when more are needed), appended, and the trainer's shuffle spreads them over
    the batches. Returns a new list.
    """
    if not 0.0 <= ratio < 1.0:
        raise DataError(f"mix ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return list(task_examples)
    if not general_examples:
        raise DataError("the general-text data for mixing is empty")
    want = round(ratio / (1.0 - ratio) * len(task_examples))
    order = list(range(len(general_examples)))
    random.Random(seed).shuffle(order)
    picked = [general_examples[order[i % len(order)]] for i in range(want)]
    return [*task_examples, *picked]


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    return path


def _nonempty(rows: Rows) -> Rows:
    if not rows:
        raise DataError(f"{rows.source}: no rows (the file holds only blank lines or a header)")
    return rows


