"""atheris fuzz target for the file readers (RELIABILITY.md row 13).

    python tests/reliability/fuzz_loaders.py -atheris_runs=100000   # run longer by hand

The first input byte picks a reader (safetensors, JSON, delta_config structure); the
rest is the file's content. Any exception other than a deltatune error is a finding
(atheris reports it and exits non-zero). The test suite runs it for a bounded number
of inputs, seeded with a real saved delta's files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import atheris
import safetensors.torch  # noqa: F401  (imported first, so only deltatune is instrumented)
import torch  # noqa: F401

with atheris.instrument_imports(include=["deltatune"]):
    from deltatune.core import io
    from deltatune.core.errors import DeltaTuneError
    from deltatune.core.payload import check_payload

_TMP = Path(tempfile.mkdtemp(prefix="dt-fuzz-"))


def one_input(data: bytes) -> None:
    """Feed one input to the reader its first byte selects."""
    if not data:
        return
    which, body = data[0] % 3, data[1:]
    path = _TMP / ("w.safetensors" if which == 0 else "c.json")
    path.write_bytes(body)
    try:
        if which == 0:
            io.load_tensors(path)
        elif which == 1:
            io.read_json(path)
        else:
            try:
                payload = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                return
            if isinstance(payload, dict):
                check_payload(path, payload, format_name="deltatune.delta", format_version=1)
    except DeltaTuneError:
        pass


def main() -> None:
    """Run atheris with the command-line arguments (libFuzzer flags)."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
