"""Every delta-tuning method, one file each. Registering a method is one line below."""

from deltatune.core.registry import register
from deltatune.methods.adalora import AdaLora, AdaLoraConfig
from deltatune.methods.bitfit import BitFit, BitFitConfig
from deltatune.methods.full import FullConfig, FullFineTune
from deltatune.methods.houlsby import Houlsby, HoulsbyConfig
from deltatune.methods.ia3 import IA3, IA3Config
from deltatune.methods.krona import KronA, KronAB, KronABConfig, KronAConfig
from deltatune.methods.loha import LoHa, LoHaConfig
from deltatune.methods.lora import Lora, LoraConfig
from deltatune.methods.mpt import MPT, MPTConfig
from deltatune.methods.parallel_adapter import ParallelAdapter, ParallelAdapterConfig
from deltatune.methods.pfeiffer import Pfeiffer, PfeifferConfig
from deltatune.methods.prefix import PrefixTuning, PrefixTuningConfig
from deltatune.methods.prompt import PromptTuning, PromptTuningConfig
from deltatune.methods.ptuning import PTuning, PTuningConfig
from deltatune.methods.ptuning_v2 import PTuningV2, PTuningV2Config
from deltatune.methods.unified import UnifiedAdapter, UnifiedConfig

register(Lora)
register(IA3)
register(AdaLora)
register(LoHa)
register(KronA)
register(KronAB)
register(UnifiedAdapter)
register(Houlsby)
register(Pfeiffer)
register(ParallelAdapter)
register(BitFit)
register(FullFineTune)
register(PrefixTuning)
register(PromptTuning)
register(PTuning)
register(PTuningV2)
register(MPT)

__all__ = [
    "AdaLora", "AdaLoraConfig",
    "BitFit", "BitFitConfig",
    "FullConfig", "FullFineTune",
    "Houlsby", "HoulsbyConfig",
    "IA3", "IA3Config",
    "KronA", "KronAB", "KronABConfig", "KronAConfig",
    "LoHa", "LoHaConfig",
    "Lora", "LoraConfig",
    "MPT", "MPTConfig",
    "PTuning", "PTuningConfig",
    "PTuningV2", "PTuningV2Config",
    "ParallelAdapter", "ParallelAdapterConfig",
    "Pfeiffer", "PfeifferConfig",
    "PrefixTuning", "PrefixTuningConfig",
    "PromptTuning", "PromptTuningConfig",
    "UnifiedAdapter", "UnifiedConfig",
]
