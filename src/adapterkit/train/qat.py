"""Quantization-aware training (`train --bits B`), as the 1-bit adapter work trains: the straight-through
estimator over fp32 latent weights.

The adapter's own tensors (which the site pools read in the forward) always hold the quantized values
q(w) of latent weights w; the optimizer updates w; the gradient taken at q(w) is applied to w as it is
(dq/dw := 1, the straight-through estimator). Pools and kernels need nothing: they see float tensors
that happen to lie on the codec's grid. At the end the latents are packed (codecs.pack), and the
tensors are the values the packed codes read back, so the stored low-bit adapter is exactly the one
that was evaluated while training.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..codecs import LowBit, pack, quantizable
from ..errors import ConfigError


class QuantAware:
    def __init__(self, codec: LowBit, adapter: Any, trainable: Sequence[torch.Tensor]) -> None:
        self.codec = codec
        ids = {id(t) for t in trainable}
        self.keys = [(s, k) for s, k in quantizable(adapter) if id(adapter.tensors[s][k]) in ids]
        if not self.keys:
            raise ConfigError(f"--bits {codec.bits} trains the adapter's float matrices at low precision; "
                              f"{adapter.method.an_adapter} trains none (its trainable tensors are vectors or "
                              "indices): leave --bits out")
        # tensor id -> (the tensor the forward reads, its fp32 latent); a tied tensor appears once
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for s, k in self.keys:
            t = adapter.tensors[s][k]
            if id(t) not in self.pairs:
                self.pairs[id(t)] = (t, t.detach().clone().float())
        self.requantize()

    def optimized(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors the optimizer updates: each quantized tensor's latent in its place."""
        return [self.pairs[id(p)][1] if id(p) in self.pairs else p for p in params]

    def move_grads(self) -> None:
        """After backward: the gradient at q(w) becomes w's (straight through)."""
        for t, w in self.pairs.values():
            w.grad, t.grad = t.grad, None

    @torch.no_grad()
    def requantize(self) -> None:
        """After each optimizer step (and a resume): the forward's tensors = q(latents)."""
        for t, w in self.pairs.values():
            t.copy_(self.codec.round_trip(w))

    @torch.no_grad()
    def finish(self, adapter: Any) -> None:
        """Pack the latents into the adapter (its `packed`), its tensors the values they read back."""
        latents = {}
        for s, k in self.keys:
            latents.setdefault(s, {})[k] = self.pairs[id(adapter.tensors[s][k])][1]
        packed = pack(self.codec, latents, self.keys)
        for s, parts in packed.unpack(torch.float32).items():
            for k, value in parts.items():
                adapter.tensors[s][k].copy_(value)
        adapter.packed = packed
