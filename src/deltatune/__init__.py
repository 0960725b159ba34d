"""deltatune: parameter-efficient fine-tuning ("delta tuning") of pretrained transformers.

    import deltatune as dt
    dm = dt.attach(model, dt.LoraConfig(r=8))      # a DeltaModel with one LoRA delta
    ...train...
    dm.save_delta("my-delta")
    dm2 = dt.load(fresh_model, "my-delta")
"""

from deltatune.core.config import LIBRARY_VERSION as __version__
from deltatune.core.config import DeltaConfig, TargetedConfig
from deltatune.core.errors import (
    AdapterFileCorrupt,
    BaseModelMismatchError,
    ConfigError,
    DataError,
    DeltaStateError,
    DeltaTuneError,
    HyperparameterError,
    MergeError,
    ModelNotAvailableError,
    NonFiniteError,
    StrictLoadError,
    TargetError,
    UnknownMethodError,
    UnsafeFileError,
)
from deltatune.core.model import DeltaModel, LoadReport, attach, load, read_delta_directory
from deltatune.core.registry import config_from_dict, get_method, known_methods
from deltatune.interop import export_merged, load_peft
from deltatune.methods import (
    AdaLoraConfig,
    BitFitConfig,
    FullConfig,
    HoulsbyConfig,
    IA3Config,
    KronABConfig,
    KronAConfig,
    LoHaConfig,
    LoraConfig,
    MPTConfig,
    ParallelAdapterConfig,
    PfeifferConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    UnifiedConfig,
)

__all__ = [
    "AdaLoraConfig",
    "AdapterFileCorrupt",
    "BaseModelMismatchError",
    "BitFitConfig",
    "ConfigError",
    "DataError",
    "DeltaConfig",
    "DeltaModel",
    "DeltaStateError",
    "DeltaTuneError",
    "FullConfig",
    "HoulsbyConfig",
    "HyperparameterError",
    "LoadReport",
    "IA3Config",
    "KronABConfig",
    "KronAConfig",
    "LoHaConfig",
    "LoraConfig",
    "MPTConfig",
    "MergeError",
    "ModelNotAvailableError",
    "NonFiniteError",
    "ParallelAdapterConfig",
    "PfeifferConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "PTuningV2Config",
    "StrictLoadError",
    "TargetError",
    "TargetedConfig",
    "UnifiedConfig",
    "UnknownMethodError",
    "UnsafeFileError",
    "__version__",
    "attach",
    "config_from_dict",
    "export_merged",
    "get_method",
    "known_methods",
    "load",
    "load_peft",
    "read_delta_directory",
]
