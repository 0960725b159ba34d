"""Every delta-tuning method, one file each. Registering a method is one line below."""

from deltatune.core.registry import register
from deltatune.methods.lora import Lora, LoraConfig
from deltatune.methods.mpt import MPT, MPTConfig
from deltatune.methods.prefix import PrefixTuning, PrefixTuningConfig
from deltatune.methods.prompt import PromptTuning, PromptTuningConfig
from deltatune.methods.ptuning import PTuning, PTuningConfig
from deltatune.methods.ptuning_v2 import PTuningV2, PTuningV2Config

register(Lora)
register(PrefixTuning)
register(PromptTuning)
register(PTuning)
register(PTuningV2)
register(MPT)

__all__ = ["Lora", "LoraConfig", "MPT", "MPTConfig", "PrefixTuning", "PrefixTuningConfig",
           "PromptTuning", "PromptTuningConfig", "PTuning", "PTuningConfig",
           "PTuningV2", "PTuningV2Config"]
