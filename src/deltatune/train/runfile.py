"""The YAML run file: everything a run needs, accepted by ``deltatune train --config``.

    model: smollm2-135m-instruct
    task: causal-lm-sft
    task_options: {max_length: 128, max_new_tokens: 32}
    method: {method: lora, r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}
    data: {train: train.jsonl, eval: val.jsonl, columns: {question: prompt}}
    train: {epochs: 1, batch_size: 8, lr: 0.0002, output_dir: runs/demo}

``deltatune train`` writes the file it actually ran (file values, then command-line
flags on top) back as ``<output_dir>/run.yaml`` with a ``result`` section, so a run can
be repeated with ``deltatune train --config runs/demo/run.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deltatune.core.errors import ConfigError

RUN_FILE = "run.yaml"
SECTIONS = ("model", "task", "task_options", "method", "data", "train", "name", "result",
            "deltatune_version")
DATA_KEYS = ("train", "eval", "val_fraction", "columns", "mix_general", "mix_ratio",
             "general_column")


def load_run_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run file; unknown sections or data keys are errors naming them."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: run file not found", field="config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})", field="config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run file must be a mapping of sections "
                          f"({', '.join(SECTIONS)})", field="config")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: "
                          f"{', '.join(SECTIONS)}", field=unknown[0])
    for section in ("task_options", "method", "data", "train"):
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping", field=section)
    bad = sorted(set(data.get("data") or {}) - set(DATA_KEYS))
    if bad:
        raise ConfigError(f"{path}: unknown data key(s) {', '.join(bad)}; known: "
                          f"{', '.join(DATA_KEYS)}", field=bad[0])
    return data


def write_run_file(path: str | os.PathLike[str], run: dict[str, Any]) -> Path:
    """Write ``run`` as YAML atomically (temp file + rename); return the path."""
    import yaml

    from deltatune.core import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(_plain(run), sort_keys=False, allow_unicode=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    io.write_bytes_durably(tmp, text.encode("utf-8"))
    os.replace(tmp, path)
    return path


def _plain(obj: Any) -> Any:
    """Tuples and paths to YAML-safe lists and strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
