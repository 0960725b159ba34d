"""Every delta-tuning method, one file each. Registering a method is one line below."""

from deltatune.core.registry import register
from deltatune.methods.ia3 import IA3, IA3Config
from deltatune.methods.lora import Lora, LoraConfig

register(Lora)
register(IA3)

__all__ = ["IA3", "IA3Config", "Lora", "LoraConfig"]
