"""Every delta-tuning method, one file each. Registering a method is one line below."""

from deltatune.core.registry import register
from deltatune.methods.lora import Lora, LoraConfig
from deltatune.methods.prefix import PrefixTuning, PrefixTuningConfig
from deltatune.methods.prompt import PromptTuning, PromptTuningConfig

register(Lora)
register(PrefixTuning)
register(PromptTuning)

__all__ = ["Lora", "LoraConfig", "PrefixTuning", "PrefixTuningConfig",
           "PromptTuning", "PromptTuningConfig"]
