"""Learned linear router: multinomial logistic regression over the prompt's meaning and form.

Features of a text (both unit rows, so neither channel dominates by scale):
    z = normalize(e - c)       e: the encoder's mean-pooled embedding [H], c: the mean of the
                               per-adapter means (as in retrieval.py)
    x = the character 1-4-gram TF-IDF row of the text (lexical.py), restricted to the U buckets
        seen in the fit texts (an unseen bucket has weight 0 anyway: the L2 penalty keeps it there)
Scores (logits) [n]:  s = W_d z + W_l x + b,  W_d [n, H], W_l [n, U] (stored dense over the seen
buckets only: 4 adapters x ~100k buckets is ~1.6 MB), b [n].

Fit (seconds): minimise mean cross-entropy + lam/2 (||W_d||^2 + ||W_l||^2) with full-batch L-BFGS on
80 % of the examples; lam is chosen from L2_GRID on the other 20 % (highest accuracy, ties: lowest
NLL), where the temperature T of softmax(s / T) is then fitted (NLL) and the OOD threshold set, exactly
as the retrieval router does: typicality = mean cosine of the UNcentered embedding to its k nearest
fit examples; below the (1 - coverage) quantile of the held-out examples' typicality -> the fallback.
Decisions (top-k, weights, fallback, unusable adapters) are the retrieval router's (`_decide_row`).

Why a learned model: nearest examples tuned on the four example tasks do not carry to new ones; a
linear model learns which dimensions and n-grams separate these particular adapters
(benchmarks/route_heldout.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import Adapter
from ..errors import ConfigError
from .common import AdapterRecord, check_adapters, records_from_meta, save_router
from .encoder import Encoder
from .lexical import Lexical
from .retrieval import (RetrievalRouter, calibration, check_options, examples_lineage, fit_temperature,
                        ood_threshold, split_examples)

TYPE = "adapterkit.router.linear"
L2_GRID = (1e-4, 1e-3, 1e-2)                                              # lam, chosen on the held-out examples
TEMPERATURES = torch.logspace(-2, 2, 161)                                 # logits are not cosines: a wider grid


@dataclass
class LinearRouter(RetrievalRouter):
    weight_dense: torch.Tensor | None = None      # [n, H]
    weight_lexical: torch.Tensor | None = None    # [n, U] over lexical.idf_buckets (None: no lexical channel)
    bias: torch.Tensor | None = None              # [n]
    l2: float = 0.0
    score_word = "score"                          # a logit, not a cosine

    def similarities(self, embeddings: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        """embeddings [N, H] (+ the N texts for the lexical channel) -> logits [N, n]."""
        z = torch.nn.functional.normalize(embeddings.float() - self.center, dim=-1)
        s = z @ self.weight_dense.t() + self.bias
        if self.lexical is None:
            return s
        if texts is None or len(texts) != embeddings.shape[0]:
            raise ConfigError(f"router {self.name!r} has a lexical channel: pass the texts with their embeddings")
        return s + torch.sparse.mm(seen_rows(self.lexical, texts), self.weight_lexical.t())

    def _lexical_meta(self) -> dict[str, Any] | None:
        return ({**self.lexical.spec(), "seen_buckets": int(self.lexical.idf_buckets.numel())}
                if self.lexical is not None else None)

    def to_meta(self) -> dict[str, Any]:
        return {**super().to_meta(), "type": TYPE, "kind": "linear", "l2": self.l2}

    def save(self, store: Any, *, overwrite: bool = False):
        from .common import check_router_name

        check_router_name(store, self.name, overwrite)
        tensors = {"center": self.center, "weight_dense": self.weight_dense, "bias": self.bias,
                   "raw_bank": self.raw_bank}
        if self.lexical is not None:
            tensors.update(self.lexical.tensors(), weight_lexical=self.weight_lexical)
        return save_router(store, self.name, self.to_meta(), tensors)

    @classmethod
    def from_artifact(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                      encoder: Encoder | None) -> "LinearRouter":
        if encoder is not None:
            encoder.check(meta["encoder"])
        fb, lex = meta.get("fallback"), meta.get("lexical")
        w = tensors["weight_dense"].float()
        router = cls(meta["name"], records_from_meta(meta), w, tensors["center"].float(), float(meta["temperature"]),
                     float(meta["threshold"]), meta["encoder"], int(meta["top_k"]), float(meta["min_weight"]),
                     float(meta.get("min_confidence", 0.0)), AdapterRecord(**fb) if fb else None,
                     meta.get("examples", {}), meta.get("calibration", {}), meta.get("created", ""), encoder,
                     kind="linear", neighbors=int(meta["neighbors"]), raw_bank=tensors["raw_bank"].float(),
                     weight_dense=w, bias=tensors["bias"].float(), l2=float(meta.get("l2", 0.0)))
        if lex:
            router.lexical = Lexical.from_artifact(lex, tensors)
            router.weight_lexical = tensors["weight_lexical"].float()
        return router


def seen_rows(lexical: Lexical, texts: Sequence[str]) -> torch.Tensor:
    """Unit TF-IDF rows of the texts over the U seen buckets only: sparse COO [N, U]."""
    x = lexical.vectors(texts)
    idx, val = x.indices(), x.values()
    buckets = lexical.idf_buckets                                 # sorted (nonzero() of a bincount)
    pos = torch.searchsorted(buckets, idx[1]).clamp(max=buckets.numel() - 1)
    hit = buckets[pos] == idx[1]
    return torch.sparse_coo_tensor(torch.stack([idx[0][hit], pos[hit]]), val[hit], (len(texts), buckets.numel()),
                                   check_invariants=False).coalesce()


def fit_logistic(z: torch.Tensor, x: torch.Tensor | None, labels: torch.Tensor, n: int, l2: float,
                 max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS: z [N, H] dense, x sparse [N, U] or None.
    Returns (W_d [n, H], W_l [n, U] or None, b [n]), deterministic for given inputs."""
    wd = torch.zeros(n, z.shape[1], requires_grad=True)
    wl = torch.zeros(n, x.shape[1], requires_grad=True) if x is not None else None
    b = torch.zeros(n, requires_grad=True)
    params = [wd, b] + ([wl] if wl is not None else [])
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ wd.t() + b
        if wl is not None:
            logits = logits + torch.sparse.mm(x, wl.t())
        penalty = (wd * wd).sum() + ((wl * wl).sum() if wl is not None else 0.0)
        loss = torch.nn.functional.cross_entropy(logits, labels) + 0.5 * l2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    return wd.detach(), (wl.detach() if wl is not None else None), b.detach()


def fit_linear(
    name: str,
    adapters: Sequence[Adapter],
    examples: Mapping[str, Sequence[str]],
    encoder: Encoder,
    *,
    held_out: Mapping[str, Sequence[str]] | None = None,
    top_k: int = 1,
    coverage: float = 0.99,
    min_weight: float = 0.05,
    min_confidence: float = 0.0,
    fallback: Adapter | None = None,
    source: str = "examples",
    neighbors: int = 10,
    lexical: bool = True,
    l2: float | None = None,
) -> LinearRouter:
    """A linear router over `adapters` from example texts per adapter name, lam chosen (or fixed by
    `l2`), temperature and OOD threshold fitted on `held_out` (default: a seeded 20 % of `examples`).
    `neighbors` is the k of the OOD typicality (>= 1 here: the linear scores say nothing about OOD)."""
    records = check_adapters(adapters)
    names = [r.name for r in records]
    check_options(names, top_k=top_k, coverage=coverage, min_weight=min_weight, neighbors=neighbors, lexical=lexical)
    if neighbors < 1:
        raise ConfigError("a linear router needs --neighbors >= 1: its out-of-distribution test is the mean cosine "
                          "to the k nearest fit examples")
    if l2 is not None and not (isinstance(l2, (int, float)) and 0 < l2 < math.inf):
        raise ConfigError(f"l2 must be a positive number, got {l2!r}")
    fit_texts, cal_texts = split_examples(names, examples, held_out, "a linear router")
    flat_fit = [t for n in names for t in fit_texts[n]]
    flat_cal = [t for n in names for t in cal_texts[n]]
    y_fit = torch.tensor([i for i, n in enumerate(names) for _ in fit_texts[n]])
    y_cal = torch.tensor([i for i, n in enumerate(names) for _ in cal_texts[n]])
    per = {n: encoder.embed(fit_texts[n]) for n in names}
    emb_fit = torch.cat(list(per.values())).float()
    emb_cal = encoder.embed(flat_cal).float()
    center = torch.stack([e.mean(0) for e in per.values()]).mean(0).float()
    z_fit = torch.nn.functional.normalize(emb_fit - center, dim=-1)
    z_cal = torch.nn.functional.normalize(emb_cal - center, dim=-1)
    lex = Lexical.fit(flat_fit) if lexical else None
    x_fit = seen_rows(lex, flat_fit) if lex else None
    x_cal = seen_rows(lex, flat_cal) if lex else None
    grid: dict[str, float] = {}
    best = None
    for lam in (L2_GRID if l2 is None else (l2,)):
        wd, wl, b = fit_logistic(z_fit, x_fit, y_fit, len(names), lam)
        logits = z_cal @ wd.t() + b + (torch.sparse.mm(x_cal, wl.t()) if wl is not None else 0.0)
        acc = float((logits.argmax(1) == y_cal).float().mean())
        nll = float(torch.nn.functional.cross_entropy(logits / fit_temperature(logits, y_cal, TEMPERATURES), y_cal))
        grid[str(lam)] = round(acc, 6)
        if best is None or (acc, -nll) > best[0]:
            best = ((acc, -nll), lam, wd, wl, b, logits)
    _, lam, wd, wl, b, logits = best
    router = LinearRouter(name, records, torch.nn.functional.normalize(wd, dim=-1), center, 1.0, -1.0, encoder.spec(),
                          top_k, min_weight, min_confidence,
                          AdapterRecord.of(fallback) if fallback is not None else None, encoder=encoder,
                          kind="linear", neighbors=neighbors,
                          raw_bank=torch.nn.functional.normalize(emb_fit, dim=-1), weight_dense=wd, bias=b, l2=lam)
    router.lexical, router.weight_lexical = lex, wl
    router.temperature = fit_temperature(logits, y_cal, TEMPERATURES)
    typical = router.typicality(emb_cal)
    router.threshold = ood_threshold(typical, coverage)
    router.calibration = calibration(logits, y_cal, router.temperature, typical >= router.threshold, coverage,
                                     {n: len(cal_texts[n]) for n in names})
    router.calibration.update({"l2": lam, "l2_accuracy": grid})
    router.examples = examples_lineage(source, names, fit_texts, cal_texts)
    return router
