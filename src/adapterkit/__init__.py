"""adapterkit: task-specific adapters over one frozen pretrained transformer."""

from .codecs import LowBit, quantize
from .core.adapter import Adapter, AdapterMeta, create_adapter
from .core.base import Base, list_bases, load_base, pull_base
from .core.batching import AdapterBatch, build_batch
from .errors import (AdapterkitError, AdapterNameError, AdapterNotFoundError, BaseMismatchError,
                     BaseNotAvailableError, ConfigError, CorruptAdapterError, TargetError,
                     UnsupportedError)
from .core.generate import generate
from .merge import merge, merge_reversible, merge_with_report, recover
from .methods import get_method, method_names
from .methods.bottleneck import BottleneckConfig
from .methods.full import FullConfig
from .methods.fusion import FusionConfig
from .methods.ia3 import Ia3Config
from .methods.lora import LoraConfig
from .methods.mora import MoraConfig
from .methods.scalearn import ScaLearnConfig
from .methods.sparse import SparseConfig
from .core.runtime import AdapterRuntime

__all__ = [
    "Adapter", "AdapterMeta", "create_adapter", "Base", "list_bases", "load_base", "pull_base",
    "AdapterBatch", "build_batch", "AdapterkitError", "AdapterNameError", "AdapterNotFoundError",
    "BaseMismatchError", "BaseNotAvailableError", "ConfigError", "CorruptAdapterError", "TargetError",
    "UnsupportedError", "generate", "merge", "merge_reversible", "merge_with_report", "recover", "get_method", "method_names", "LoraConfig", "Ia3Config", "BottleneckConfig", "SparseConfig", "FullConfig",
    "ScaLearnConfig", "FusionConfig", "MoraConfig", "LowBit", "quantize",
    "AdapterRuntime",
]
__version__ = "0.1.0"
