"""Fixtures for the data set tests: a private cache, no network, tiny source archives.

Builders are exercised on archives written here in the exact layout of the real
sources (wheel = zip, npm = tgz, Debian = ar + tar), so no test downloads anything.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from deltatune.datasets._common import Source

# The real download method, kept for the tests of its error handling (which fake the
# subprocess); the autouse fixture below replaces it for every test.
REAL_FETCH = Source.fetch


@pytest.fixture(autouse=True)
def offline_home(tmp_path, monkeypatch):
    """A fresh $DELTATUNE_HOME per test, and any download attempt fails loudly."""
    home = tmp_path / "home"
    monkeypatch.setenv("DELTATUNE_HOME", str(home))

    def no_network(self, into):
        raise AssertionError(f"test tried to download {self.describe()}")

    monkeypatch.setattr(Source, "fetch", no_network)
    return home


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """Write a zip (wheel) holding ``files``; return its path."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_tgz(path: Path, files: dict[str, bytes]) -> Path:
    """Write a gzipped tar (an npm pack result) holding ``files``; return its path."""
    path.write_bytes(_tar_bytes(files, "w:gz"))
    return path


def make_deb(path: Path, files: dict[str, bytes], version: str = "1:3.0-99") -> Path:
    """Write a Debian package: ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    control = f"Package: wordnet-base\nVersion: {version}\nArchitecture: all\n".encode()
    members = {
        "debian-binary": b"2.0\n",
        "control.tar.xz": _tar_bytes({"./control": control}, "w:xz"),
        "data.tar.xz": _tar_bytes({f"./{k}": v for k, v in files.items()}, "w:xz"),
    }
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = (f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n").encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path
