"""Every delta-tuning method, one file each. Registering a method is one line below."""

from deltatune.core.registry import register
from deltatune.methods.adalora import AdaLora, AdaLoraConfig
from deltatune.methods.bitfit import BitFit, BitFitConfig
from deltatune.methods.combine import Combination, CombinationConfig
from deltatune.methods.full import FullConfig, FullFineTune
from deltatune.methods.houlsby import Houlsby, HoulsbyConfig
from deltatune.methods.ia3 import IA3, IA3Config
from deltatune.methods.ipt import IPT, IPTConfig
from deltatune.methods.krona import KronA, KronAB, KronABConfig, KronAConfig
from deltatune.methods.loha import LoHa, LoHaConfig
from deltatune.methods.lora import Lora, LoraConfig
from deltatune.methods.mam import Mam, MamConfig
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
register(Combination)
register(UnifiedAdapter)
register(Houlsby)
register(Pfeiffer)
register(ParallelAdapter)
register(BitFit)
register(FullFineTune)
register(PrefixTuning)
register(PromptTuning)
register(Mam)
register(PTuning)
register(PTuningV2)
register(MPT)
register(IPT)

__all__ = [
    "AdaLora", "AdaLoraConfig",
    "BitFit", "BitFitConfig",
    "Combination", "CombinationConfig",
    "FullConfig", "FullFineTune",
    "Houlsby", "HoulsbyConfig",
    "IA3", "IA3Config",
    "IPT", "IPTConfig",
    "KronA", "KronAB", "KronABConfig", "KronAConfig",
    "LoHa", "LoHaConfig",
    "Lora", "LoraConfig",
    "Mam", "MamConfig",
    "MPT", "MPTConfig",
    "PTuning", "PTuningConfig",
    "PTuningV2", "PTuningV2Config",
    "ParallelAdapter", "ParallelAdapterConfig",
    "Pfeiffer", "PfeifferConfig",
    "PrefixTuning", "PrefixTuningConfig",
    "PromptTuning", "PromptTuningConfig",
    "UnifiedAdapter", "UnifiedConfig",
]
