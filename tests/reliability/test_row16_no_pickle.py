"""RELIABILITY.md row 16 (security: no pickle).

Static: no ``pickle``/``dill``/``cloudpickle``/``joblib``/``shelve``/``marshal`` import,
no ``torch.load`` (except with ``weights_only=True`` written at the call), no
``np.load(..., allow_pickle=True)``, no ``yaml.load``/``unsafe_load`` and no
``pandas.read_pickle`` anywhere in the package. Dynamic: a malicious pickle planted in
a delta directory is refused and never executed, and a whole save/load cycle runs with
every unpickling entry point booby-trapped.
"""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import UnsafeFileError
from tests.reliability._files import saved_toy_delta
from tests.reliability._toy import fill, lora, toy

PACKAGE = Path(dt.__file__).parent
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal", "pickletools"}


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where} imports {a.name}" for a in node.names
                    if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in \
                BANNED_MODULES:
            out.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")\
                and any(a.name == "load" for a in node.names):
            out.append(f"{where} imports load from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            tail = name.rsplit(".", 1)[-1]
            if name.endswith("torch.load"):
                if not _keyword_is_true(node, "weights_only"):
                    out.append(f"{where} calls {name} without weights_only=True")
            elif tail == "load" and name.split(".")[0] in ("np", "numpy") and \
                    _keyword_is_true(node, "allow_pickle"):
                out.append(f"{where} calls {name}(allow_pickle=True)")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") or \
                    tail == "read_pickle" or name.endswith("serialization.load"):
                out.append(f"{where} calls {name}")
    return out


def test_the_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    findings = [f for path in files for f in _findings(path)]
    assert findings == []


def test_the_static_check_catches_what_it_should(tmp_path):
    bad = PACKAGE / "_probe_for_static_check.py"
    try:
        bad.write_text("import pickle\nimport torch\nimport numpy as np\nimport yaml\n"
                       "torch.load('x')\nnp.load('y', allow_pickle=True)\nyaml.load('z')\n"
                       "torch.load('ok', weights_only=True)\nfrom torch import load\n")
        found = _findings(bad)
    finally:
        bad.unlink()
    assert len(found) == 5, found


class _Exploit:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("filename", ["adapter_model.bin", "delta.pt", "optimizer.pt",
                                      "rng_state.pth", "scheduler.pkl", "training_args.bin"])
def test_a_planted_pickle_is_refused_and_never_run(tmp_path, filename):
    marker = tmp_path / "pwned"
    directory = saved_toy_delta(tmp_path / "d")
    (directory / filename).write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(UnsafeFileError, match=re.escape(filename) + ".*never unpickles"):
        dt.load(toy(), directory)
    assert not marker.exists()


def test_a_directory_of_only_pickles_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "delta.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(UnsafeFileError):
        dt.load(toy(), directory)
    assert not marker.exists()


def test_save_and_load_never_touch_an_unpickler(tmp_path, monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("an unpickling function was called")

    for target, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):
        monkeypatch.setattr(target, attr, trap)
    dm = dt.DeltaModel(toy())
    dm.add("d", lora())
    fill(dm)
    dm.save_delta(tmp_path / "d")
    back = dt.load(toy(), tmp_path / "d")
    assert torch.equal(back.delta_state_dict()["proj.lora_A"], dm.delta_state_dict()[
        "proj.lora_A"])
    saved_toy_delta(tmp_path / "e")
