"""Sites: each target module of the base is wrapped ONCE by a forward hook and holds one pool per
method. The hook reads the runtime's current AdapterBatch (built once per step) and adds every
pool's delta to the module output. Hooks keep the base's module tree and state_dict unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .methods import MethodSpec, SitePool, site_info

if TYPE_CHECKING:
    from .runtime import AdapterRuntime


class Site:
    def __init__(self, runtime: "AdapterRuntime", name: str, module: nn.Module) -> None:
        self.runtime = runtime
        self.module = module
        self.info = site_info(name, module)
        self.pools: dict[str, SitePool] = {}
        self._handle = module.register_forward_hook(self._hook)

    def pool(self, spec: MethodSpec, capacity: int) -> SitePool:
        if spec.name not in self.pools:
            self.pools[spec.name] = spec.make_pool(self.info, capacity)
        return self.pools[spec.name]

    def empty(self) -> bool:
        return all(len(p) == 0 for p in self.pools.values())

    def close(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        batch = self.runtime.active_batch
        if batch is None or batch.kernel == "none":
            return output
        x = args[0]
        for pool in self.pools.values():
            output = pool.apply(x, output, batch, module.training)
        return output
