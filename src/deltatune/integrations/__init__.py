"""Bridges to other training frameworks (Hugging Face ``Trainer``...)."""
