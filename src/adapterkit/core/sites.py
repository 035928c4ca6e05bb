"""Sites: each module of the base that adapters attach to is hooked ONCE and holds one pool per
method. The hooks read the runtime's current AdapterBatch (built once per step): a forward pre-hook
runs the input methods (x -> x'), a forward hook the output and module methods (y -> y'), each in
the order of its method's stage. Hooks keep the base's module tree and state_dict unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..methods import ATTACH_INPUT, Method, SiteInfo, SitePool
from ..methods.base import STAGE_INPUT


def pool_key(method: Method, attach: str) -> str:
    """A site's key for a family's pool: its name, with the attachment when it is not the family's usual one."""
    return method.name if attach == method.attach else f"{method.name}:{attach}"


class Site:
    def __init__(self, batch: Callable[[], Any], info: SiteInfo, module: nn.Module) -> None:
        """batch: returns the step's AdapterBatch (None: run the bare module)."""
        self.batch = batch
        self.module = module
        self.info = info
        self.pools: dict[str, SitePool] = {}   # pool_key(method, attachment) -> its pool here
        self._members: dict[str, set[int]] = {}    # pool key -> the slots it holds here
        # (pool, its slots) of the input methods / the output and module methods, by stage
        self._inputs: list[tuple[SitePool, set[int]]] = []
        self._outputs: list[tuple[SitePool, set[int]]] = []
        self._stages: dict[str, tuple[int, str]] = {}     # pool key -> (stage, attachment)
        self._handles = [module.register_forward_hook(self._hook)]     # the pre-hook comes with an input method

    def pool(self, method: Method, capacity: int, attach: str) -> SitePool:
        """The pool of `method` attached here as `attach` (one family may attach to one module in two ways:
        IA3 scales a module's output for one config and its input for another)."""
        key = pool_key(method, attach)
        if key not in self.pools:
            self.pools[key] = method.make_pool(self.info, capacity)
            self._members[key] = set()
            self._stages[key] = (method.stage if attach != ATTACH_INPUT else STAGE_INPUT, attach)
            order = sorted(self.pools, key=lambda k: (self._stages[k][0], k))    # stage, then name: a fixed order
            if attach == ATTACH_INPUT and not self._inputs:
                self._handles.append(self.module.register_forward_pre_hook(self._pre_hook))
            self._inputs = [(self.pools[k], self._members[k]) for k in order if self._stages[k][1] == ATTACH_INPUT]
            self._outputs = [(self.pools[k], self._members[k]) for k in order if self._stages[k][1] != ATTACH_INPUT]
        return self.pools[key]

    def add(self, method: Method, capacity: int, attach: str, slot: int, config: Any, tensors: Any,
            own: str) -> None:
        """Put one adapter's tensors for this module into its family's pool (created on first use)."""
        self.pool(method, capacity, attach).add(slot, config, tensors, own)
        self._members[pool_key(method, attach)].add(slot)

    def remove(self, key: str, slot: int) -> None:
        self.pools[key].remove(slot)
        self._members[key].discard(slot)

    def empty(self) -> bool:
        return all(len(p) == 0 for p in self.pools.values())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        batch = self.batch()
        if not self._inputs or batch is None or batch.kernel == "none":
            return None
        x = args[0]
        for pool, members in self._inputs:
            if not members.isdisjoint(batch.unique):      # a pool none of the step's adapters is in: skipped
                x = pool.apply(x, None, batch, module.training)
        return (x, *args[1:])

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        batch = self.batch()
        if not self._outputs or batch is None or batch.kernel == "none":
            return output
        x = args[self.info.input_arg]      # the module's (block's) input as it saw it (after any input method)
        for pool, members in self._outputs:
            if not members.isdisjoint(batch.unique):      # a pool none of the step's adapters is in: skipped
                output = pool.apply(x, output, batch, module.training)
        return output
