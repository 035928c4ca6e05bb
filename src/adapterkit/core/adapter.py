"""Adapter: a name, a method config, per-site tensors and metadata; save/load.

On disk an adapter is a folder. For families PEFT knows (LoRA) the folder is a PEFT adapter
(adapter_config.json + adapter_model.safetensors), so PEFT loads it as is; for the others it is the
native format (formats/native.py: the declared tensors, dtypes kept, in adapter.safetensors). Our own
metadata (config, base fingerprint, task, metrics, lineage) sits beside it in adapterkit.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_write_dir, recover_dir
from ..formats import SIDE_FILE
from ..errors import AdapterNameError, BaseMismatchError, CorruptAdapterError, NonFiniteError
from ..methods import Method, config_from_dict, get_method
from .targets import match_targets, site_info

FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise AdapterNameError(
            f"adapter name {name!r} is malformed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class AdapterMeta:
    base_fingerprint: str | None = None
    base_name: str | None = None
    task: str | None = None
    labels: list[str] = field(default_factory=list)       # label set of a classification task
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # The id other tools resolve the base by, as adapter_config.json's base_model_name_or_path says: the
    # upstream hub id of a built-in (base_name keeps adapterkit's alias, e.g. "smollm2-135m") or of a
    # folder whose config records one, else the folder path. None: not known yet (set on save) or no
    # base; adapterkit.json files written before this field load with None.
    base_model: str | None = None

    @classmethod
    def from_peft(cls, path: str | Path) -> "AdapterMeta":
        """What a plain PEFT folder (no adapterkit.json) says of its base: base_model_name_or_path, and
        as base_name the built-in it names (by upstream hub id or alias) or the local folder it names.
        The base fingerprint, the real compatibility check, is unknown for such a folder."""
        from .base import builtin_for
        from ..formats.peft import read_base_model

        base_model = read_base_model(path)
        base_name = builtin_for(base_model)
        if base_name is None and base_model is not None and (Path(base_model) / "config.json").is_file():
            base_name = base_model
        return cls(base_name=base_name, base_model=base_model)


@dataclass
class Adapter:
    name: str
    config: Any                                   # the method's frozen config (has `type`)
    tensors: dict[str, dict[str, torch.Tensor]]   # site (module path) -> tensor name -> tensor
    meta: AdapterMeta = field(default_factory=AdapterMeta)
    head: Any = None                              # a task head saved with the adapter (heads.py), or None
    # A low-bit adapter's packed matrices (codecs.Packed), saved as they are; `tensors` holds the values they
    # read back, which every kernel computes with. None: stored as floats. (codecs.quantize makes one.)
    packed: Any = None

    def __post_init__(self) -> None:
        validate_name(self.name)

    @property
    def method(self) -> Method:
        return get_method(self.config.type)

    @property
    def sites(self) -> list[str]:
        return list(self.tensors)

    def num_parameters(self) -> int:
        """Trainable entries (a sparse adapter's indices and shapes are not parameters; a tensor the family
        ties across sites, ScaLearn++'s ω, counts once)."""
        kinds = self.method.tensor_kinds(self.config)
        total = sum(t.numel() for parts in self.tensors.values() for k, t in parts.items() if kinds[k].trainable)
        for key, sites in self.method.tied(self.config, list(self.tensors)):
            total -= sum(self.tensors[s][key].numel() for s in sites[1:])
        return total

    def ranks(self) -> list[int]:
        """Distinct ranks over sites (low-rank families; [] for the others)."""
        rank = getattr(self.method, "rank", None)
        return sorted({rank(p) for p in self.tensors.values()}) if rank is not None else []

    def summary(self) -> str:
        """One line for inspect, ls, show and the catalog, e.g. "lora r=8 alpha=16" ("..., 1-bit g64" packed)."""
        line = self.method.summary(self.config, self.tensors)
        return line if self.packed is None else f"{line}, {self.packed.codec.label()}"

    def stored_bytes(self) -> int:
        """Bytes of the tensors as stored: packed codes and scales, the other tensors in their dtype."""
        skip = {(s, k) for s, k, _ in self.packed.layout} if self.packed is not None else set()
        return (self.packed.nbytes if self.packed is not None else 0) + sum(
            t.numel() * t.element_size() for site, parts in self.tensors.items() for k, t in parts.items()
            if (site, k) not in skip)

    def dequantized(self) -> "Adapter":
        """The same adapter stored as floats (the values the packed codes read back): for PEFT, which has no
        low-bit adapters, and for anything that changes the tensors."""
        import copy

        out = copy.copy(self)
        out.packed = None
        return out

    def check_finite(self, dtype: torch.dtype = torch.float32) -> "Adapter":
        """Raise NonFiniteError naming the first tensor (or site ΔW) that holds NaN / inf or whose
        values overflow `dtype` (the dtype the adapter will run in). Returns self."""
        limit = torch.finfo(dtype).max
        spec = self.method
        for site, parts in self.tensors.items():
            for key, t in parts.items():
                _check_tensor(self.name, f"{site}.{key}", t, dtype, limit)
            peak = spec.max_delta(self.config, site, parts, limit)
            if peak is not None and not peak <= limit:           # also catches NaN
                raise NonFiniteError(
                    f"adapter {self.name!r}: its weight change at {site} reaches {peak:.3g}, beyond "
                    f"{str(dtype).removeprefix('torch.')}'s range ({limit:.3g}); the adapter's weights or "
                    "scale are corrupt: re-train or re-save it")
        head = self.head
        for key, t in (vars(head).items() if head is not None else ()):
            if isinstance(t, torch.Tensor):
                _check_tensor(self.name, f"task head {key}", t, torch.float32, torch.finfo(torch.float32).max)
        return self

    def save(self, path: str | Path) -> Path:
        """Write atomically: an interrupted save leaves the previous folder at `path` intact."""
        return atomic_write_dir(path, self._write)

    def _write(self, folder: Path) -> None:
        from .base import upstream_id
        from ..formats.native import write_native
        from ..formats.peft import write_peft

        meta = self.meta
        if meta.base_model is None and meta.base_name:      # derived from the alias: callers pass base_name only
            meta.base_model = upstream_id(meta.base_name) or meta.base_name
        if self.method.peft_type is not None and self.packed is None:   # PEFT's format where PEFT has the family
            write_peft(folder, self.config, self.tensors, meta.base_model)
        else:                                               # every family; low-bit adapters (PEFT has none)
            write_native(folder, self.tensors, self.packed)
        side = {
            "type": "adapterkit.adapter",
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "config": self.config.to_dict(),
            "meta": asdict(self.meta),
        }
        if self.packed is not None:
            side["codec"] = self.packed.to_dict()
        (folder / SIDE_FILE).write_text(json.dumps(side, indent=2), encoding="utf-8")
        if self.head is not None:
            self.head.save(folder)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, *, head: bool = True) -> "Adapter":
        """Load our folder (any family) or a PEFT folder of a family adapterkit has; `name` defaults to the
        saved name or folder name. Refuses tensors with NaN / inf (NonFiniteError naming the tensor).
        head=False skips the task head (generation does not use it, so a damaged head does not stop it)."""
        from ..formats.native import read_native
        from ..formats.peft import CONFIG_FILE, read_peft

        path = Path(path)
        recover_dir(path)
        if not path.is_dir():
            raise CorruptAdapterError(f"adapter folder {path} does not exist")
        side_path = path / SIDE_FILE
        if side_path.exists() and not side_path.is_file():
            raise CorruptAdapterError(f"{side_path} is not a file; remove it or save the adapter again")
        side = _read_side(side_path) if side_path.is_file() else None
        if side is not None:
            try:
                side_config = config_from_dict(side["config"])
                side_meta = AdapterMeta(**side.get("meta", {}))
            except (KeyError, TypeError, AttributeError) as exc:
                raise CorruptAdapterError(f"{side_path} lacks or mangles a field ({type(exc).__name__}: {exc}); "
                                          "save the adapter again") from None
        packed = None
        if side is not None and (get_method(side_config.type).peft_type is None or "codec" in side):   # native
            codec = side.get("codec")
            if codec is not None and not isinstance(codec, dict):
                raise CorruptAdapterError(f"{side_path}: 'codec' is not a JSON object; quantize the adapter again")
            tensors, packed = read_native(path, side_config, get_method(side_config.type), codec)
            config, meta, saved_name = side_config, side_meta, side.get("name")
        else:
            if not (path / CONFIG_FILE).is_file() and side is None:
                raise CorruptAdapterError(f"{path} has neither {CONFIG_FILE} (a PEFT adapter) nor {SIDE_FILE} "
                                          "(an adapterkit adapter): not an adapter folder")
            config, tensors = read_peft(path)
            meta, saved_name = AdapterMeta.from_peft(path), None   # what a plain PEFT folder says of its base
            if side is not None:
                _check_agree(path, config, side_config)
                config = side_config              # it also keeps what PEFT has no key for (init, init_std)
                meta, saved_name = side_meta, side.get("name")
        from .heads import load_head

        adapter = cls(name or saved_name or path.name, config, tensors, meta, load_head(path) if head else None,
                      packed)
        return adapter.check_finite()


def _read_side(side_path: Path) -> dict[str, Any]:
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptAdapterError(f"{side_path} is not valid JSON ({exc})") from None
    if not isinstance(side, dict):
        raise CorruptAdapterError(f"{side_path} is not a JSON object; save the adapter again")
    if side.get("type") != "adapterkit.adapter" or not isinstance(side.get("format_version", 0), int) \
            or side.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptAdapterError(
            f"{side_path} is type {side.get('type')!r} version {side.get('format_version')!r}; "
            f"this adapterkit reads adapterkit.core.adapter up to version {FORMAT_VERSION}: upgrade adapterkit")
    return side


def _check_agree(path: Path, peft_config: Any, side_config: Any) -> None:
    """adapter_config.json (what PEFT reads) and adapterkit.json (ours) must describe one adapter:
    where they differ, PEFT and adapterkit would run different adapters from the same folder."""
    from ..formats.peft import CONFIG_FILE, config_to_peft

    try:
        ours = config_to_peft(side_config, None)
    except AttributeError:                    # a method PEFT has no format for: nothing to compare
        return
    theirs = config_to_peft(peft_config, None)
    diff = [f"{k} ({theirs.get(k)!r} vs {ours.get(k)!r})" for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)]
    if diff:
        raise CorruptAdapterError(
            f"adapter folder {path}: {CONFIG_FILE} and {SIDE_FILE} disagree on {', '.join(diff)}; PEFT reads the "
            f"first, adapterkit the second, so they would run different adapters: fix the edited file or save the "
            "adapter again")


def _check_tensor(name: str, what: str, t: torch.Tensor, dtype: torch.dtype, limit: float) -> None:
    if not t.is_floating_point():
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise NonFiniteError(f"adapter {name!r}: tensor {what} has {bad} non-finite value(s) (NaN or inf); "
                             "the adapter is corrupt: re-train or re-save it")
    peak = float(t.abs().max()) if t.numel() else 0.0
    if peak > limit:
        raise NonFiniteError(f"adapter {name!r}: tensor {what} has values up to {peak:.3g}, beyond "
                             f"{str(dtype).removeprefix('torch.')}'s range ({limit:.3g}); the adapter is corrupt: "
                             "re-train or re-save it")


def check_same_base(adapters: Any, action: str, fix: str) -> None:
    """Raise BaseMismatchError naming both fingerprints unless every adapter that records a base
    records the same one. action: e.g. "merge adapters"; fix: the advice after the semicolon."""
    first = next((a for a in adapters if a.meta.base_fingerprint), None)
    for a in adapters:
        fp = a.meta.base_fingerprint
        if first is not None and fp and fp != first.meta.base_fingerprint:
            raise BaseMismatchError(
                f"cannot {action} of different bases: {first.name!r} was made for "
                f"{first.meta.base_name or '?'} ({first.meta.base_fingerprint}) but {a.name!r} for "
                f"{a.meta.base_name or '?'} ({fp}); {fix}")


def create_adapter(
    name: str,
    model: nn.Module,
    config: Any,
    *,
    seed: int = 0,
    fingerprint: str | None = None,
    base_name: str | None = None,
    task: str | None = None,
) -> Adapter:
    """A fresh adapter for every module of `model` that `config` targets (seeded init)."""
    spec = get_method(config.type)
    sites = match_targets(model, config.target_modules, getattr(config, "exclude_modules", None))
    modules = dict(model.named_modules())
    infos = [site_info(s, modules[s], spec.attach_at(config, s)) for s in sites]
    for info in infos:
        spec.check_site(info, name)
    if any(i.fan_in_fan_out for i in infos) and hasattr(config, "fan_in_fan_out"):
        config = type(config).from_dict({**config.to_dict(), "fan_in_fan_out": True})
    gen = torch.Generator().manual_seed(seed)
    tensors = {info.name: spec.init_tensors(config, info, gen) for info in infos}
    meta = AdapterMeta(base_fingerprint=fingerprint, base_name=base_name, task=task)
    return Adapter(validate_name(name), config, tensors, meta)
