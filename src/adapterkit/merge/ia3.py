"""Weight-space merge of IA3 adapters, as PEFT defines it (`IA3Model.add_weighted_adapter`):
l = Σ_i w_i l_i at every site of the union of the inputs' sites, where an input without the site
adds nothing (PEFT's loop skips it; so a site only one input scales gets w_1 l_1, not a blend with
the identity: give weights summing to 1 and matching targets for a plain average). A site must scale
the same side (input or output) in every input that has it."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.adapter import Adapter, AdapterMeta
from ..errors import ConfigError
from ..methods.ia3 import Ia3Config


def linear_ia3(inputs: Any, weights: Sequence[float], params: dict[str, Any], name: str,
               lineage: dict[str, Any]) -> Adapter:
    if params.get("rank") is not None:
        raise ConfigError("merge 'linear' of IA3 adapters has no rank (an IA3 vector is not factored): "
                          "leave rank out")
    sums: dict[str, torch.Tensor] = {}
    feedforward: dict[str, bool] = {}
    for a, w in zip(inputs.adapters, weights):
        for site, parts in a.tensors.items():
            ff = a.config.feedforward(site)
            if feedforward.setdefault(site, ff) != ff:
                raise ConfigError(f"merge 'linear': site {site!r} scales its input in one IA3 input and its output "
                                  "in another; merge adapters with the same feedforward_modules")
            term = w * parts["ia3_l"].float()
            sums[site] = term if site not in sums else sums[site] + term
    config = Ia3Config(target_modules=tuple(sums), feedforward_modules=tuple(s for s, f in feedforward.items() if f),
                       fan_in_fan_out=any(a.config.fan_in_fan_out for a in inputs.adapters))
    meta = AdapterMeta(base_fingerprint=inputs.base_fingerprint, base_name=inputs.base_name, lineage=[lineage])
    return Adapter(name, config, {s: {"ia3_l": t.contiguous()} for s, t in sums.items()}, meta)
