"""Learned gate (MeteoRA-style): at every transformer layer a small linear gate reads each token's
hidden state and picks the top-k adapters from a fixed set of frozen LoRAs for that token, mixing
them with softmax weights. So one prompt that chains two tasks switches adapters mid-sequence.

Per layer l (in forward order), token hidden state h (the layer's input) [H]:
    logits_l = W_l · (h / rms(h)) + b_l                     W_l [n, H], b_l [n]  (n adapters)
    (i_1..i_k) = top-k(logits_l);  w = softmax(logits_l[i_1..i_k])
    every adapted module inside layer l adds  Σ_j w_j · ΔW_{i_j} x   for that token
The (ids [T, k], weights [T, k]) of a layer go through the runtime's mixed-batch kernels as one
token-mode AdapterBatch (AdapterRuntime.batch_from_ids(..., mode="token")), set active for exactly
the duration of that layer's forward (a forward pre-hook enters it, a forward hook leaves it).

Training (train_gate): the LoRAs stay frozen; only W, b learn, from the task loss (through the
softmax weights of the chosen adapters) plus gate_weight · the cross-entropy of every layer's gate
logits against the known task (adapter index) of every token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ConfigError
from .common import (AdapterRecord, Decision, check_adapters, check_base, check_count, check_positive,
                     check_prompts, check_router_name, check_top_k, now, records_from_meta, save_router,
                     verify_router)

TYPE = "adapterkit.router.gate"
IGNORE = -100


def site_modules(rt: Any, names: Sequence[str]) -> list[str]:
    """Module names of the sites the named (attached) adapters adapt."""
    return sorted({m for n in names for m in rt.modules_of(n)})


def find_layers(model: torch.nn.Module, sites: Sequence[str]) -> list[str]:
    """The blocks of the model's layer list (the nn.ModuleList holding the most sites) that contain
    a site, in forward order. Every site must sit inside one of them."""
    best, best_cover = None, -1
    for lname, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            prefixes = [f"{lname}.{i}." if lname else f"{i}." for i in range(len(module))]
            cover = sum(any(s.startswith(p) for p in prefixes) for s in sites)
            if cover > best_cover:
                best, best_cover = (lname, prefixes), cover
    if best is None:
        raise ConfigError("the model has no layer list (nn.ModuleList); a gate needs transformer layers")
    lname, prefixes = best
    outside = [s for s in sites if not any(s.startswith(p) for p in prefixes)]
    if outside:
        raise ConfigError(f"adapted module(s) {outside[:3]} are outside the layers of {lname!r}; a per-layer gate "
                          "routes only adapters of modules inside the transformer layers")
    return [p[:-1] for p in prefixes if any(s.startswith(p) for s in sites)]


@dataclass
class GateTrace:
    """What one gated forward did, per gated layer: logits [T, n] (with grad when training), ids
    [T, k] adapter indices (into the router's names), weights [T, k]."""
    logits: list[torch.Tensor] = field(default_factory=list)
    ids: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)


@dataclass
class GateRouter:
    name: str
    records: list[AdapterRecord]
    layers: list[str]                 # module names of the gated layers, forward order
    weight: torch.Tensor              # [L, n, H]
    bias: torch.Tensor                # [L, n]
    top_k: int = 1
    training: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=now)
    unusable: dict[str, str] = field(default_factory=dict)
    kind: str = "gate"

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    @classmethod
    def create(cls, name: str, rt: Any, adapters: Sequence[Any], *, top_k: int = 1, seed: int = 0,
               init_std: float = 0.02) -> "GateRouter":
        """A fresh gate over `adapters` (Adapter objects attached to `rt`), small random init."""
        records = check_adapters(adapters)
        check_base(records, rt.fingerprint, rt.base_name)
        names = [r.name for r in records]
        check_top_k(top_k, names)
        layers = find_layers(rt.model, site_modules(rt, names))
        hidden = int(rt.model.config.hidden_size)
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(len(layers), len(names), hidden, generator=gen) * init_std
        return cls(name, records, layers, weight, torch.zeros(len(layers), len(names)), top_k)

    # ------------------------------------------------------------------ the gate
    def layer_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [T, n] (T = all leading positions flattened; unusable: -inf)."""
        h = hidden.reshape(-1, hidden.shape[-1]).float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        logits = h @ self.weight[layer].t() + self.bias[layer]
        if self.unusable:
            mask = torch.tensor([n in self.unusable for n in self.names])
            logits = logits.masked_fill(mask, float("-inf"))
        return logits

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, n] -> (ids [T, k] adapter indices, weights [T, k] softmax over the top k)."""
        top_v, top_i = logits.topk(self.top_k, dim=-1)
        return top_i, torch.softmax(top_v, dim=-1)

    @contextlib.contextmanager
    def routing(self, rt: Any) -> Iterator[GateTrace]:
        """Inside, every forward of rt.model is gated per token at every layer; yields the trace of
        the forwards run inside (cleared by the caller if it runs several)."""
        if len(self.unusable) >= len(self.names):
            raise ConfigError(f"gate {self.name!r} has no usable adapter: {'; '.join(self.unusable.values())}")
        check_base(self.records, rt.fingerprint, rt.base_name)
        slots = torch.tensor([rt.slot(n) for n in self.names])          # AdapterNotFoundError if not attached
        modules = dict(rt.model.named_modules())
        missing = [m for m in self.layers if m not in modules]
        if missing:
            raise ConfigError(f"gate {self.name!r} was fitted on a model with layers {missing[:3]}, which this model "
                              "lacks; load the gate onto its own base")
        if int(rt.model.config.hidden_size) != self.weight.shape[-1]:
            raise ConfigError(f"gate {self.name!r} reads hidden size {self.weight.shape[-1]}, this model has "
                              f"{rt.model.config.hidden_size}; load the gate onto its own base")
        trace, pending, handles = GateTrace(), [], []

        def pre_hook(layer: int):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                logits = self.layer_logits(layer, hidden)
                ids, weights = self.select(logits)
                grad = torch.is_grad_enabled() and weights.requires_grad
                batch = rt.batch_from_ids(slots[ids], weights, mode="token", kernel="dense" if grad else "auto")
                ctx = rt.use(batch)
                ctx.__enter__()
                pending.append(ctx)
                trace.logits.append(logits)
                trace.ids.append(ids)
                trace.weights.append(weights)
            return hook

        def post_hook(module, args, output):
            if pending:
                pending.pop().__exit__(None, None, None)

        try:
            for layer, mname in enumerate(self.layers):
                handles.append(modules[mname].register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
                handles.append(modules[mname].register_forward_hook(post_hook, always_call=True))
            yield trace
        finally:
            for h in handles:
                h.remove()
            while pending:
                pending.pop().__exit__(None, None, None)

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight, self.bias]

    # ------------------------------------------------------------------ sequence-level decisions
    @torch.no_grad()
    def summarize(self, trace: GateTrace, attention_mask: torch.Tensor) -> list[Decision]:
        """One Decision per row from a gated forward: adapters = the share of (token, layer) weight
        each adapter got; scores = mean gate probability; confidence = the top mean probability."""
        b, t = attention_mask.shape
        mask = attention_mask.reshape(b, t, 1).float()
        n = len(self.names)
        probs = torch.zeros(b, n)
        usage = torch.zeros(b, n)
        for logits, ids, weights in zip(trace.logits, trace.ids, trace.weights):
            p = torch.softmax(logits.detach(), -1).reshape(b, t, n)
            probs += (p * mask).sum(1) / mask.sum(1).clamp(min=1)
            u = torch.zeros(b * t, n).scatter_add_(1, ids, weights.detach().float()).reshape(b, t, n)
            usage += (u * mask).sum(1)
        probs /= max(len(trace.logits), 1)
        usage /= usage.sum(1, keepdim=True).clamp(min=1e-12)
        out = []
        for i in range(b):
            top = int(probs[i].argmax())
            adapters = {self.names[j]: round(float(usage[i, j]), 6) for j in range(n) if usage[i, j] > 0}
            out.append(Decision(adapters, {nm: round(float(v), 6) for nm, v in zip(self.names, probs[i])},
                                float(probs[i, top]), False,
                                f"per-token gate: {self.names[top]!r} has the largest mean gate probability "
                                f"{float(probs[i, top]):.3f} over {int(mask[i].sum())} tokens x {len(self.layers)} layers"))
        return out

    def route(self, rt: Any, texts: Sequence[str], max_length: int = 128) -> list[Decision]:
        """Run the gated base over the prompts and summarize (the server's per-request answer)."""
        from ..train.classification import encode_texts, hidden_states

        texts = check_prompts(texts)
        batch = encode_texts(rt.tokenizer, texts, max_length)
        with torch.no_grad(), self.routing(rt) as trace:
            hidden_states(rt.model, batch)
        return self.summarize(trace, batch["attention_mask"])

    # ------------------------------------------------------------------ checks and artifact
    def check_base(self, fingerprint: str | None, base_name: str | None = None) -> None:
        check_base(self.records, fingerprint, base_name)

    def verify(self, store: Any, *, strict: bool = True) -> dict[str, str]:
        """As RetrievalRouter.verify: strict raises StaleRouterError; else stale adapters get -inf logits."""
        return verify_router(self, self.records, store, strict)

    def to_meta(self) -> dict[str, Any]:
        return {"type": TYPE, "format_version": 1, "kind": self.kind, "name": self.name,
                "adapters": [vars(r) for r in self.records], "layers": self.layers, "top_k": self.top_k,
                "hidden_size": int(self.weight.shape[-1]), "training": self.training, "created": self.created}

    def save(self, store: Any, *, overwrite: bool = False):
        check_router_name(store, self.name, overwrite)
        return save_router(store, self.name, self.to_meta(),
                           {"weight": self.weight.detach(), "bias": self.bias.detach()})

    @classmethod
    def from_artifact(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "GateRouter":
        return cls(meta["name"], records_from_meta(meta), list(meta["layers"]), tensors["weight"].float(),
                   tensors["bias"].float(), int(meta["top_k"]), meta.get("training", {}), meta.get("created", ""))


# ---------------------------------------------------------------------------- training
def gate_loss(trace: GateTrace, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean over layers of the cross-entropy of the gate logits [T, n] against labels [B, T]
    (adapter index per token, IGNORE for padding); and the top-1 accuracy over layers and tokens."""
    flat = labels.reshape(-1)
    valid = flat != IGNORE
    losses = [torch.nn.functional.cross_entropy(lg, flat, ignore_index=IGNORE) for lg in trace.logits]
    correct = sum(int((lg.argmax(-1)[valid] == flat[valid]).sum()) for lg in trace.logits)
    return torch.stack(losses).mean(), correct / max(int(valid.sum()) * len(trace.logits), 1)


def token_labels(attention_mask: torch.Tensor, tasks: Sequence[int]) -> torch.Tensor:
    """[B, T] labels: each row's adapter index on its tokens, IGNORE on padding."""
    t = torch.tensor(list(tasks)).view(-1, 1).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), t, torch.full_like(t, IGNORE))


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over non-pad tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             target.reshape(-1), ignore_index=IGNORE)


def check_options(*, steps: int = 100, lr: float = 1e-2, gate_weight: float = 1.0, batch_size: int = 8) -> None:
    """Gate training's options, checked before any work (fit_router calls it first too)."""
    check_count("steps (--steps, gate training steps)", steps)
    check_positive("lr (--lr, the gate's learning rate)", lr)
    check_positive("gate_weight (--gate-weight)", gate_weight, zero=True)
    check_count("batch_size (--batch-size)", batch_size)


def train_gate(gate: GateRouter, rt: Any, batches: Sequence[dict[str, torch.Tensor]], *, steps: int = 100,
               lr: float = 1e-2, gate_weight: float = 1.0,
               task_loss: Callable[[torch.nn.Module, dict], torch.Tensor] | None = causal_lm_loss,
               on_step: Callable[[int, dict], None] | None = None) -> list[dict[str, float]]:
    """Train the gate's W, b (the adapters and base stay frozen). Each batch: input_ids,
    attention_mask [B, T], gate_labels [B, T] (adapter index per token, IGNORE to skip), plus what
    task_loss reads. Batches are cycled in order. Returns one record per step."""
    check_options(steps=steps, lr=lr, gate_weight=gate_weight)
    if not batches:
        raise ConfigError("train_gate needs at least one batch")
    gate.weight.requires_grad_(True)
    gate.bias.requires_grad_(True)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    history = []
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            with gate.routing(rt) as trace:
                if task_loss is not None:
                    task = task_loss(rt.model, batch)
                else:                                    # the gate cross-entropy alone: a body forward
                    from ..train.classification import hidden_states

                    hidden_states(rt.model, batch)
                    task = torch.zeros(())
                g_loss, acc = gate_loss(trace, batch["gate_labels"])
            loss = task + gate_weight * g_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec = {"step": step + 1, "loss": loss.item(), "task_loss": task.item(), "gate_loss": g_loss.item(),
                   "gate_accuracy": acc}
            history.append(rec)
            if on_step is not None:
                on_step(step + 1, rec)
    finally:
        gate.weight.requires_grad_(False)
        gate.bias.requires_grad_(False)
    gate.training = {**gate.training, "steps": steps, "lr": lr, "gate_weight": gate_weight,
                     "final": history[-1] if history else {}}
    return history
