"""Interchange formats (PEFT today)."""
