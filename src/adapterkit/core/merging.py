"""Merging adapters into the base weights, exactly and reversibly: W += w · ΔW (and b += w · Δb where
a family changes the bias, as IA3 does) summed in fp32 and rounded once; each tensor before the first
merge is kept, so unmerge() restores it bit for bit; and
exporting a plain transformers folder of the merged base. AdapterRuntime inherits this (it holds the
state: `_originals`, `_merged`, `_merge_weights`, `_site_maps`, `_sites`, `_modules`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .._atomic import atomic_write_dir
from ..errors import ConfigError, UnsupportedError


class MergingMixin:
    def merge(self, name: str, weight: float = 1.0) -> None:
        """W += weight · ΔW at every site of the adapter. The original weight is kept, so unmerge()
        restores it bit for bit. Merges apply in the families' stage order whatever the call order
        (weight-linear changes such as LoRA's before IA3's scaling, which scales what they made), so
        the merged base equals the adapters stacked at run time: merging a LoRA after an IA3 restores
        the weights and merges both again in that order."""
        self.slot(name)  # raises for an unknown name
        adapter = self.adapters[name]
        if name in self._merged:
            raise ConfigError(f"adapter {name!r} is already merged")
        spec = adapter.method
        if not spec.mergeable:
            raise UnsupportedError(f"adapter {name!r} is {spec.an_adapter}, which is not linear in the base "
                                   "weights: it cannot be merged into the base; run it as an adapter instead")
        later = [n for n in self._merged if self.adapters[n].method.stage > spec.stage]
        if not later:
            self._merge_one(name, weight)
            self._merged.append(name)
            self._merge_weights[name] = weight
            return
        order = sorted([*self._merged, name], key=lambda n: self.adapters[n].method.stage)   # stable: call order
        weights = {**self._merge_weights, name: weight}
        self.unmerge()
        for n in order:
            self._merge_one(n, weights[n])
            self._merged.append(n)
            self._merge_weights[n] = weights[n]

    def _merge_one(self, name: str, weight: float) -> None:
        adapter = self.adapters[name]
        spec = adapter.method
        with torch.no_grad():
            for own, module_name in self._site_maps[name].items():
                module = self._modules[module_name]
                info = replace(self._sites[module_name].info, name=own)
                # the weight as merged so far: a change that depends on W (IA3) scales what earlier merges made
                delta = spec.delta_weight(adapter.config, info, adapter.tensors[own], module.weight.detach())
                bias = getattr(module, "bias", None)
                delta_b = (spec.delta_bias(adapter.config, info, adapter.tensors[own], bias.detach())
                           if bias is not None else None)
                for key, param, change in (("weight", module.weight, delta), ("bias", bias, delta_b)):
                    if change is None:
                        continue
                    if (module_name, key) not in self._originals:
                        self._originals[module_name, key] = param.detach().clone()
                    # p + w·Δp summed in fp32 and rounded once (a bf16 add would round Δp first)
                    merged = param.float() + weight * change.to(param.device, torch.float32)
                    param.copy_(merged.to(param.dtype))

    def unmerge(self) -> None:
        with torch.no_grad():
            for (module_name, key), original in self._originals.items():
                getattr(self._modules[module_name], key).copy_(original)
        self._originals.clear()
        self._merged.clear()
        self._merge_weights.clear()

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    def export_merged(self, path: str | Path, adapters: Sequence[str] = (), tokenizer: Any = None,
                      dtype: torch.dtype | str | None = None) -> Path:
        """Write a plain transformers folder of the base with `adapters` merged in (plus any merged
        already), its weights in `dtype` (default: the base's; merging runs in fp32 and each weight is
        rounded once, so an fp32 runtime writing bf16 is as exact as bf16 allows); the runtime's
        weights are restored afterwards."""
        from .base import resolve_dtype

        before, before_weights = list(self._merged), dict(self._merge_weights)
        dtype = self._dtype if dtype is None else resolve_dtype(dtype)
        try:
            for name in adapters:
                if name not in self._merged:
                    self.merge(name)

            def write(tmp: Path) -> None:
                state = None
                if dtype != self._dtype:       # cast a copy; tied weights stay one tensor (saved once)
                    state, cast = {}, {}
                    for k, v in self.model.state_dict().items():
                        key = (v.data_ptr(), v.shape)
                        if key not in cast:
                            cast[key] = v.to(dtype) if v.is_floating_point() else v
                        state[k] = cast[key]
                self.model.save_pretrained(str(tmp), state_dict=state)
                if state is not None:          # save_pretrained records the model's dtype, not the file's
                    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
                    config["dtype"] = str(dtype).removeprefix("torch.")
                    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                                     encoding="utf-8")
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))

            return atomic_write_dir(path, write)
        finally:
            if self._merged != before:
                self.unmerge()
                for name in before:
                    self.merge(name, before_weights[name])
