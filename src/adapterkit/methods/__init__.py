"""Adapter families: the contract every family declares (base.py), one file per family (lora.py ...),
the registry (registry.py), and the shared mixed-batch kernels (kernels.py)."""

from __future__ import annotations

from .base import (ATTACH_INPUT, ATTACH_MODULE, ATTACH_OUTPUT, Method, SiteInfo, SitePool, TensorKind)
from .registry import config_from_dict, get_method, method_for_peft, method_names, peft_types, register_method

__all__ = ["ATTACH_INPUT", "ATTACH_MODULE", "ATTACH_OUTPUT", "Method", "SiteInfo", "SitePool", "TensorKind",
           "config_from_dict", "get_method", "method_for_peft", "method_names", "peft_types", "register_method"]
