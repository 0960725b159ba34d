"""Hugging Face PEFT's adapter directory format, read and written.

A PEFT adapter directory holds ``adapter_config.json`` (``peft_type`` plus the method's
options) and ``adapter_model.safetensors`` whose keys look like
``base_model.model.<module path>.lora_A.weight``. Each method that PEFT also has is one
:class:`PeftMapping` in :data:`MAPPINGS` (the per-method key and config table; LoRA's is
in :mod:`deltatune.interop.peft_lora`): it turns PEFT's config and tensors into a
deltatune config and our tensor keys, and back.

PEFT directories carry no base-model fingerprint, so what a load can check is taken
from the tensors themselves: every module they name must exist in the model, with the
input and output sizes the tensors imply, and the model type in ``auto_mapping`` must
be the model's. A directory that deltatune wrote also carries our full fingerprint in
the safetensors metadata (PEFT ignores it), so it gets the full check.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.core import io
from deltatune.core.config import DeltaConfig
from deltatune.core.errors import (
    AdapterFileCorrupt,
    BaseModelMismatchError,
    ConfigError,
    NonFiniteError,
    UnknownMethodError,
    UnsafeFileError,
)
from deltatune.core.layers import DeltaLayer, ModuleCopy, layer_dims, layer_kind
from deltatune.core.registry import AttachedDelta

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_LEGACY_FILE = "adapter_model.bin"
# PeftModel holds the LoraModel/IA3Model... as `base_model`, which holds the HF model as
# `model`: every saved key starts with this.
PEFT_PREFIX = "base_model.model."
# Safetensors metadata keys deltatune adds to PEFT files (PEFT reads only "format").
META_FINGERPRINT = "deltatune.base_model"
META_NAME = "deltatune.name"
META_CARD = "deltatune.card"


@dataclass
class Converted:
    """A PEFT adapter turned into deltatune terms (config + our tensor keys).

    ``layer_dims`` maps each adapted module to the (d_in, d_out) its tensors imply (None
    where they do not say);
    ``copies`` lists modules saved in full (``modules_to_save``); ``base_copies`` holds
    full copies of base weights that PEFT sometimes saves (embeddings after a vocabulary
    resize), which must equal the model's own weights to be dropped.
    """

    config: DeltaConfig
    tensors: dict[str, torch.Tensor]
    layer_dims: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    copies: list[str] = field(default_factory=list)
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PeftMapping:
    """How one method maps between PEFT's format and ours.

    ``to_ours(peft_config, tensors)`` gets PEFT's config dict and its tensors with the
    ``base_model.model.`` prefix removed, and returns a :class:`Converted`.
    ``to_peft(model, delta, tensors)`` gets the attached delta and its saved tensors (our
    keys) and returns (PEFT config dict, tensors with PEFT keys, prefix included).
    """

    peft_type: str
    method: str
    to_ours: Callable[[dict[str, Any], dict[str, torch.Tensor]], Converted]
    to_peft: Callable[[nn.Module, AttachedDelta, dict[str, torch.Tensor]],
                      tuple[dict[str, Any], dict[str, torch.Tensor]]]
    # Optional: adjust the converted tensors/config once the model is known (after the
    # checks, before attaching), e.g. where our layout of a tensor depends on the layer.
    fit_to_model: Callable[[nn.Module, Converted], None] | None = None


MAPPINGS: dict[str, PeftMapping] = {}


def register_mapping(mapping: PeftMapping) -> PeftMapping:
    """Add ``mapping`` to the table (one line per method); return it."""
    MAPPINGS[mapping.peft_type] = mapping
    return mapping


# deltatune method -> the module of this package holding its PEFT mapping. A mapping is
# imported only when its method is registered (methods land one by one).
MAPPING_MODULES = {"lora": "peft_lora", "ia3": "peft_ia3", "loha": "peft_loha",
                   "adalora": "peft_adalora", "prompt": "peft_prompt",
                   "prefix": "peft_prompt", "ptuning": "peft_prompt"}


def _ensure_loaded() -> None:
    # Importing the mapping modules runs their register lines.
    from deltatune.core.registry import known_methods

    registered = set(known_methods())
    for method, module in MAPPING_MODULES.items():
        if method in registered and importlib.util.find_spec(
                f"deltatune.interop.{module}") is not None:
            # a method can land before its PEFT mapping; it is then simply not offered
            importlib.import_module(f"deltatune.interop.{module}")


def mapping_for_peft_type(peft_type: Any, source: str = "") -> PeftMapping:
    """Return the mapping for PEFT's ``peft_type`` string, or raise naming the supported ones."""
    _ensure_loaded()
    if isinstance(peft_type, str) and peft_type.upper() in MAPPINGS:
        return MAPPINGS[peft_type.upper()]
    known = ", ".join(sorted(MAPPINGS))
    raise UnknownMethodError(f"{source}: PEFT adapter type {peft_type!r} cannot be read by "
                             f"deltatune yet; readable types: {known}. Load it with peft, or "
                             f"retrain it with a deltatune method.", field="peft_type")


def mapping_for_method(method: str) -> PeftMapping:
    """Return the mapping for deltatune method ``method``, or raise if PEFT has no twin."""
    _ensure_loaded()
    for mapping in MAPPINGS.values():
        if mapping.method == method:
            return mapping
    writable = ", ".join(sorted(m.method for m in MAPPINGS.values()))
    raise ConfigError(f"method {method!r} has no Hugging Face PEFT format (PEFT-writable "
                      f"methods: {writable}); save it with format='deltatune'.", field="format")


def is_peft_directory(directory: str | Path) -> bool:
    """True when ``directory`` looks like a PEFT adapter (has adapter_config.json)."""
    return (Path(directory) / PEFT_CONFIG_FILE).is_file()


# -- refusing options we do not reproduce ---------------------------------------------------
def refuse_options(config: dict[str, Any], refused: dict[str, tuple[Any, str]],
                   source: str) -> None:
    """Raise :class:`ConfigError` when an option in ``refused`` has a non-neutral value.

    ``refused`` maps a PEFT option to (its neutral values, why deltatune refuses it).
    Neutral values are a tuple; None, False, {} and [] are always neutral.
    """
    for key, (neutral, why) in refused.items():
        value = config.get(key)
        if value in (None, False, {}, []) or value in neutral:
            continue
        raise ConfigError(f"{source}: PEFT option {key}={value!r} is not supported: {why}. "
                          f"Nothing was loaded.", field=key)


def peft_pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """Resolve a PEFT ``rank_pattern``/``alpha_pattern`` entry for one module.

    This is PEFT's rule (``peft.utils.other.get_pattern_key``): the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module_name)`` wins; otherwise ``default``.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def split_copy_keys(keys: list[str], patterns: list[str]) -> dict[str, str]:
    """Map each key of a saved module copy to its module path, using PEFT's suffix rule.

    A key ``classifier.out_proj.weight`` with pattern ``classifier`` belongs to module
    ``classifier``. Keys that match no pattern are left out of the result.
    """
    out: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        for end in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:end])
            if any(prefix == p or prefix.endswith("." + p) for p in patterns):
                out[key] = prefix
                break
    return out


# PEFT adds these heads to modules_to_save itself for classification task types.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}


def split_other_tensors(rest: dict[str, torch.Tensor], peft_config: dict[str, Any]
                        ) -> tuple[dict[str, torch.Tensor], list[str], dict[str, torch.Tensor]]:
    """Sort the tensors that are not the method's own.

    Returns (module-copy tensors under our keys, the copied module paths, full copies of
    base weights). Copies are the ``modules_to_save`` of the config (plus the heads PEFT
    adds for classification tasks); anything else is a base weight PEFT saved
    (``<m>.base_layer.weight`` is reported as ``<m>.weight``).
    """
    patterns = list(peft_config.get("modules_to_save") or [])
    patterns += TASK_HEADS.get(str(peft_config.get("task_type")), [])
    owners = split_copy_keys(list(rest), patterns)
    base_copies = {k.replace(".base_layer.", "."): v for k, v in rest.items()
                   if k not in owners}
    return {k: rest[k] for k in owners}, sorted(set(owners.values())), base_copies


def group_by_module(tensors: dict[str, torch.Tensor], leaves: Any, what: str
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split PEFT tensors into ``{module: {leaf: tensor}}`` for the method's own leaf names
    and the rest (module copies). Returns both; raises :class:`AdapterFileCorrupt` naming
    ``what`` when no tensor of the method is there at all."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        loc, _, leaf = key.rpartition(".")
        if leaf in leaves:
            groups.setdefault(loc, {})[leaf] = tensor
        else:
            rest[key] = tensor
    if not groups:
        raise AdapterFileCorrupt(PEFT_WEIGHTS_FILE, f"{what} adapter without any "
                                 f"{'/'.join(sorted(leaves))} tensor")
    return groups, rest


def copy_tensors_to_peft(tensors: dict[str, torch.Tensor], copies: list[str],
                         prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """Return the module-copy tensors among ``tensors`` under PEFT's keys.

    ``prefix`` is ``base_model.model.`` for the tuner methods and ``base_model.`` for the
    prompt-learning ones (PEFT wraps the model one level less deep there).
    """
    return {prefix + k: v for k, v in tensors.items()
            if any(k.startswith(c + ".") for c in copies)}


def peft_targets(model: nn.Module, locations: list[str]) -> list[str]:
    """Leaf names (``["q_proj", "v_proj"]``) when PEFT would select exactly ``locations``
    from them, else the full module paths.

    Serving engines (vLLM, TGI, LoRAX) expect leaf names; full paths are always exact.
    """
    from deltatune.core.targets import iter_candidate_modules

    leaves = sorted({loc.rsplit(".", 1)[-1] for loc in locations})
    selected = {n for n, _ in iter_candidate_modules(model)
                if any(n == leaf or n.endswith("." + leaf) for leaf in leaves)}
    return leaves if selected == set(locations) else list(locations)


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a model class (``LlamaForCausalLM`` -> ``CAUSAL_LM``)."""
    cls = type(model).__name__
    for marker, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                         ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if marker in cls:
            return task
    return None


def common_peft_config(model: nn.Module, peft_type: str, copies: list[str]) -> dict[str, Any]:
    """The keys every PEFT config has: type, task, base model, ``modules_to_save``."""
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "") or None
    return {
        "peft_type": peft_type,
        "task_type": task_type_of(model),
        "auto_mapping": {"base_model_class": type(model).__name__,
                         "parent_library": type(model).__module__},
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": copies or None,
        "exclude_modules": None,
    }


# -- reading ------------------------------------------------------------------------------
def _read_tensors(directory: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor],
                                                                 dict[str, str]]:
    safe, legacy = directory / PEFT_WEIGHTS_FILE, directory / PEFT_LEGACY_FILE
    if safe.exists():
        return io.load_tensors(safe)
    if not legacy.exists():
        raise AdapterFileCorrupt(directory, f"a PEFT adapter directory needs "
                                 f"{PEFT_WEIGHTS_FILE} (or a legacy {PEFT_LEGACY_FILE}); "
                                 f"neither is there")
    if not allow_pickle:
        raise UnsafeFileError(
            f"{legacy}: a legacy pickle-format PEFT adapter. deltatune does not unpickle "
            f"files by default. If you trust where it came from, pass allow_pickle=True "
            f"(CLI: --allow-pickle); it is then read with torch.load(weights_only=True), "
            f"which rebuilds tensors only. Better: convert it once with `deltatune export "
            f"--delta {directory} --allow-pickle --format peft --out NEW_DIR`.")
    warnings.warn(f"{legacy}: reading a pickle-format adapter because allow_pickle=True "
                  f"(torch.load with weights_only=True). Convert it to safetensors.",
                  stacklevel=4)
    try:
        obj = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, refused globals, truncated files
        raise AdapterFileCorrupt(legacy, f"torch.load(weights_only=True) refused or failed "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise AdapterFileCorrupt(legacy, "expected a dict of name -> tensor")
    return dict(obj), {}


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def read_peft_directory(directory: str | Path, *, allow_nonfinite: bool = False,
                        allow_pickle: bool = False):
    """Read a PEFT adapter directory into a :class:`~deltatune.core.model.SavedDelta`.

    Checks the JSON config, the refused options, the safetensors structure (and a
    manifest, when deltatune wrote one) and the tensors' finiteness; the returned
    object's ``check_model`` compares the tensors with a model before anything attaches.
    """
    from deltatune.core.config import LIBRARY_VERSION
    from deltatune.core.model import SavedDelta

    directory = Path(directory)
    source = str(directory)
    if (directory / io.MANIFEST).exists():
        io.verify_manifest(directory)
    peft_config = io.read_json(directory / PEFT_CONFIG_FILE, what="PEFT adapter config")
    mapping = mapping_for_peft_type(peft_config.get("peft_type"), source)
    raw, metadata = _read_tensors(directory, allow_pickle)
    if not allow_nonfinite:
        for key, t in raw.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"{source}: tensor {key!r} holds NaN/inf; refusing to load "
                                     f"it (pass allow_nonfinite=True to inspect it anyway).")
    try:
        converted = mapping.to_ours(peft_config, _strip_prefix(raw))
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise type(exc)(f"{source}: {exc}", field=exc.field) from None
    fingerprint = _json_meta(metadata, META_FINGERPRINT, directory) or {}
    if not fingerprint and (peft_config.get("auto_mapping") or {}).get("base_model_class"):
        # For display only (deltatune info, cards): a class name is never compared.
        fingerprint = {"class": peft_config["auto_mapping"]["base_model_class"]}
    card = _json_meta(metadata, META_CARD, directory) or {}
    if peft_config.get("base_model_name_or_path"):
        card.setdefault("base_model_name", peft_config["base_model_name_or_path"])
    payload = {
        "format": "peft",
        "library_version": LIBRARY_VERSION,
        "peft_version": peft_config.get("peft_version"),
        "name": metadata.get(META_NAME) or "default",
        "config": converted.config.to_dict(),
        "base_model": fingerprint,
        "parameters": sum(t.numel() for t in converted.tensors.values()),
        "card": card,
        "peft_config": peft_config,
    }

    def check_model(model: nn.Module, level: str) -> None:
        check_against_model(model, converted, peft_config, level=level, source=source)
        if mapping.fit_to_model is not None:
            mapping.fit_to_model(model, converted)

    return SavedDelta(directory, payload, converted.config, converted.tensors, check_model)


def _json_meta(metadata: dict[str, str], key: str, directory: Path) -> dict[str, Any] | None:
    text = metadata.get(key)
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise AdapterFileCorrupt(directory / PEFT_WEIGHTS_FILE,
                                 f"metadata {key!r} is not valid JSON") from None
    return value if isinstance(value, dict) else None


# -- checks against a model ---------------------------------------------------------------
def _unwrapped(module: nn.Module) -> nn.Module:
    if isinstance(module, DeltaLayer):
        return module.base
    if isinstance(module, ModuleCopy):
        return module.original
    return module


def _find(model: nn.Module, location: str) -> nn.Module | None:
    try:
        return _unwrapped(model.get_submodule(location))
    except AttributeError:
        return None


def _model_type_of_library(parent_library: str) -> str | None:
    # "transformers.models.llama.modeling_llama" -> "llama"
    parts = parent_library.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return None


def check_against_model(model: nn.Module, converted: Converted, peft_config: dict[str, Any], *,
                        level: str, source: str) -> None:
    """Raise :class:`BaseModelMismatchError` if the adapter does not fit ``model``.

    Checked in order, before any weight is copied: the model type PEFT recorded, that
    every targeted module exists, that each has the (d_in, d_out) the tensors imply, and
    that saved full copies of modules have the model's shapes. ``level='off'`` skips the
    checks (full base-weight copies are still compared: they would replace weights).
    """
    fix = "load it onto the base model it was trained on"
    if level != "off":
        auto = peft_config.get("auto_mapping") or {}
        saved_type = _model_type_of_library(str(auto.get("parent_library") or ""))
        found_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
        if saved_type and found_type and saved_type.replace("-", "_") != \
                found_type.replace("-", "_"):
            raise BaseModelMismatchError(
                f"{source}: the adapter was saved on a {saved_type!r} model "
                f"({auto.get('base_model_class')}), this model is {found_type!r}; {fix}.")
        names = [n for n, _ in model.named_modules() if n]
        missing = [loc for loc in [*converted.layer_dims, *converted.copies]
                   if _find(model, loc) is None]
        if missing:
            close = difflib.get_close_matches(missing[0], names, n=1, cutoff=0.6)
            hint = f" (closest here: {close[0]!r})" if close else ""
            raise BaseModelMismatchError(
                f"{source}: the adapter targets {len(missing)} module(s) this model does not "
                f"have, e.g. {', '.join(repr(m) for m in missing[:4])}{hint}; {fix}.")
        for loc, (d_in, d_out) in converted.layer_dims.items():
            module = _find(model, loc)
            try:
                found_in, found_out = layer_dims(module)
            except TypeError:
                raise BaseModelMismatchError(
                    f"{source}: module {loc!r} is a {type(module).__name__} here, which the "
                    f"adapter cannot sit on; {fix}.") from None
            if (d_in not in (None, found_in)) or (d_out not in (None, found_out)):
                what = "vocabulary x dim" if layer_kind(module) == "embedding" else "in x out"
                raise BaseModelMismatchError(
                    f"{source}: module {loc!r} is {found_in} x {found_out} ({what}) in this "
                    f"model, but the adapter's tensors expect {d_in} x {d_out} (another "
                    f"hidden size?); {fix}.")
        for loc in converted.copies:
            state = _find(model, loc).state_dict()
            for key, tensor in converted.tensors.items():
                if key.startswith(loc + "."):
                    sub = key[len(loc) + 1:]
                    if sub in state and tuple(state[sub].shape) != tuple(tensor.shape):
                        raise BaseModelMismatchError(
                            f"{source}: saved module {loc!r} tensor {sub!r} has shape "
                            f"{list(tensor.shape)}, this model's has "
                            f"{list(state[sub].shape)} (another number of labels?); {fix}.")
    for key, tensor in converted.base_copies.items():
        loc, _, sub = key.rpartition(".")
        module = _find(model, loc)
        own = module.state_dict().get(sub) if module is not None else None
        if own is None or tuple(own.shape) != tuple(tensor.shape) or not torch.allclose(
                own.float().cpu(), tensor.float(), rtol=1e-3, atol=1e-6):
            raise BaseModelMismatchError(
                f"{source}: the adapter carries a full copy of base weight {key!r} that "
                f"differs from this model's (PEFT saves it after a vocabulary resize); resize "
                f"the model's embeddings and load the matching weights first, or load it "
                f"with peft.")
