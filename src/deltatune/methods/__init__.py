"""Every delta-tuning method, one file each. Registering a method is one line below."""

from deltatune.core.registry import register
from deltatune.methods.adalora import AdaLora, AdaLoraConfig
from deltatune.methods.combine import Combination, CombinationConfig
from deltatune.methods.ia3 import IA3, IA3Config
from deltatune.methods.krona import KronA, KronAB, KronABConfig, KronAConfig
from deltatune.methods.loha import LoHa, LoHaConfig
from deltatune.methods.lora import Lora, LoraConfig

register(Lora)
register(IA3)
register(AdaLora)
register(LoHa)
register(KronA)
register(KronAB)
register(Combination)

__all__ = [
    "AdaLora", "AdaLoraConfig",
    "Combination", "CombinationConfig",
    "IA3", "IA3Config",
    "KronA", "KronAB", "KronABConfig", "KronAConfig",
    "LoHa", "LoHaConfig",
    "Lora", "LoraConfig",
]
