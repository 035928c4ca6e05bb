"""Learned per-token gates (route/gate.py) inside the engine's flat forward.

A gated request has no fixed adapter: at every gated layer, the gate reads each of the request's
new tokens' hidden state (the layer's input) and picks its top-k adapters with softmax weights.
Rows of other requests in the same step keep their fixed adapters. So per layer l the step's
routing is one token-mode AdapterBatch [T, K]:
    rows of fixed requests:   their (slot, weight) pairs (as for the whole forward), zero-padded to K
    rows of a gated request:  (slots[top-k ids of gate_l(h_t)], softmax weights), zero-padded to K
set active for exactly layer l's forward (FlatDecoder.hidden's before_layer). A gate only adapts
modules inside the transformer layers (GateRouter.create checks), so the rest of the forward
(lm_head) runs without adapters for gated rows.

The gate's decisions for a token depend only on that token's hidden states, which causal attention
makes the same whether the sequence runs in one forward or token by token: the engine equals
GateRouter.routing over a full HF forward (tested).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch

from ..errors import ConfigError


def gate_layers(gate: Any, model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> dict[int, int]:
    """{decoder layer index: gate layer index} for the gate's layers in this model (ConfigError if
    the gate was fitted on another model)."""
    modules = dict(model.named_modules())
    index = {id(layer): i for i, layer in enumerate(layers)}
    missing = [m for m in gate.layers if m not in modules or id(modules[m]) not in index]
    if missing:
        raise ConfigError(f"gate {gate.name!r} was fitted on a model with layers {missing[:3]}, which the served "
                          "base lacks; serve the gate with its own base")
    hidden = int(model.config.hidden_size)
    if gate.weight.shape[-1] != hidden:
        raise ConfigError(f"gate {gate.name!r} reads hidden size {gate.weight.shape[-1]}, the served base has "
                          f"{hidden}; serve the gate with its own base")
    return {index[id(modules[m])]: g for g, m in enumerate(gate.layers)}


@dataclass
class GateState:
    """One gated sequence: its gate, the runtime slot of each gate adapter (0: unusable, never
    chosen), the layer map, and the gate weight each adapter got, summed over (token, layer)."""

    gate: Any
    slots: torch.Tensor                      # [n] long
    layer_of: dict[int, int]
    usage: torch.Tensor = field(init=False)  # [n] float64

    def __post_init__(self) -> None:
        self.usage = torch.zeros(len(self.gate.names), dtype=torch.float64)

    def shares(self) -> dict[str, float]:
        """{adapter: share of the gate weight it got} over every token the gate routed."""
        total = float(self.usage.sum())
        if total <= 0:
            return {}
        return {n: round(float(u) / total, 6) for n, u in zip(self.gate.names, self.usage) if u > 0}


def layer_routing(runtime: Any, ids: torch.Tensor, weights: torch.Tensor,
                  gated: Sequence[tuple[int, int, GateState]]) -> Callable[[int, torch.Tensor], ContextManager[Any]]:
    """ids, weights [T, k]: the step's fixed routing; gated: (start, n, state) per gated sequence's
    rows. Returns FlatDecoder.hidden's before_layer."""
    T, k = ids.shape

    def before(i: int, h: torch.Tensor) -> ContextManager[Any]:
        parts = []
        for start, n, st in gated:
            g = st.layer_of.get(i)
            if g is None:                               # a layer the gate does not adapt
                continue
            # The gate's tensors are read to the host (route/gate.py): its tokens' states go there.
            hs = h[0, start:start + n].to(st.gate.weight.device)
            top_ids, top_w = st.gate.select(st.gate.layer_logits(g, hs))               # [n, top_k]
            st.usage.scatter_add_(0, top_ids.flatten(), top_w.flatten().double())
            parts.append((start, n, st.slots[top_ids], top_w))
        if not parts:
            return contextlib.nullcontext()             # the step's fixed routing stays active
        width = max([k] + [p[2].shape[1] for p in parts])
        layer_ids = torch.zeros(T, width, dtype=torch.long, device=ids.device)        # host, as ids
        layer_w = torch.zeros(T, width, dtype=weights.dtype, device=ids.device)
        layer_ids[:, :k], layer_w[:, :k] = ids, weights
        for start, n, slots, w in parts:
            layer_ids[start:start + n] = 0
            layer_w[start:start + n] = 0
            layer_ids[start:start + n, :slots.shape[1]] = slots
            layer_w[start:start + n, :w.shape[1]] = w.to(weights.dtype)
        return runtime.use(runtime.batch_from_ids(layer_ids, layer_w, mode="token"))

    return before
