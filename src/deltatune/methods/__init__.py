"""Every delta-tuning method, one file each. Registering a method is one line below."""

from deltatune.core.registry import register
from deltatune.methods.lora import Lora, LoraConfig

register(Lora)

__all__ = ["Lora", "LoraConfig"]
