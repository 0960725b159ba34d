"""Every delta-tuning method, one file each. Registering a method is one line below."""

from deltatune.core.registry import register
from deltatune.methods.bitfit import BitFit, BitFitConfig
from deltatune.methods.full import FullConfig, FullFineTune
from deltatune.methods.houlsby import Houlsby, HoulsbyConfig
from deltatune.methods.lora import Lora, LoraConfig
from deltatune.methods.parallel_adapter import ParallelAdapter, ParallelAdapterConfig
from deltatune.methods.pfeiffer import Pfeiffer, PfeifferConfig
from deltatune.methods.unified import UnifiedAdapter, UnifiedConfig

register(Lora)
register(UnifiedAdapter)
register(Houlsby)
register(Pfeiffer)
register(ParallelAdapter)
register(BitFit)
register(FullFineTune)

__all__ = [
    "BitFit", "BitFitConfig", "FullConfig", "FullFineTune",
    "Houlsby", "HoulsbyConfig", "Lora", "LoraConfig", "ParallelAdapter", "ParallelAdapterConfig",
    "Pfeiffer", "PfeifferConfig", "UnifiedAdapter", "UnifiedConfig",
]
