"""Retrieval router (training-free): the adapter whose examples are nearest wins.

Fit: embed examples of each adapter's task with a frozen encoder (encoder.py: mean-pooled hidden
states), subtract the center c (the mean of the per-adapter means: mean-pooled states of one model
share a large common direction, which would make every cosine ≈ 1) and normalise. Two scorings:
  * neighbors = k > 0 (default 10): the adapter's score is the mean cosine of the prompt to its k
    nearest examples (a bank of every fit example is stored). Tasks whose prompts form several
    clusters (tweets on many topics) are not reduced to one mean: on the 4-task benchmark with
    MiniLM (benchmarks/route.py, dense only) this routed 0.949 (1024 examples per task) vs 0.920 for
    one descriptor per adapter (256 examples; 0.925 with 64).
  * neighbors = 0: one descriptor per adapter, d_a = normalize(mean_i normalize(e_i - c)), score
    s_a = cos(e - c, d_a) (smaller artifact; fewer examples needed).

Lexical channel (lexical.py, on by default): the same scoring (k nearest, or one descriptor) over
hashed character n-gram TF-IDF vectors of the texts, mixed in:  s_a = (dense_a + w * lexical_a) / (1 + w).
w is chosen at fit time on the held-out examples from LEXICAL_WEIGHTS (highest held-out accuracy, ties:
lowest NLL); w = 0 drops the channel. On the 4-task benchmark the dense kNN alone misroutes short
reviews ("It bites hard.") to chit-chat and trivia questions to reviews; form (quotes, @handles,
"Which ...?") separates them: routing 0.948 -> 0.958 (MiniLM), 0.868 -> 0.923 (the base's states).

Route a text with embedding e: s_a for every adapter a as above, then
  * OOD: typicality t < threshold  ->  the fallback (the base, or a named fallback adapter), where
    t = the mean cosine of the UNcentered normalised embedding to its k nearest fit examples of any
    adapter (with neighbors = k > 0; with descriptors, t = max_a s_a). Centering helps telling the
    tasks apart but hides how far a prompt is from all of them: at the same 0.99 calibration
    coverage, t sends 0.745 of Reuters news and 0.48 of 20 Newsgroups posts to the fallback, max_a s_a
    only 0.235 and 0.035 (MiniLM + lexical; benchmarks/route_ood.py). threshold = the (1 - coverage)
    quantile of t over held-out in-task examples, so a share `coverage` of in-task prompts pass;
  * otherwise p = softmax(s / T) (T fitted on the held-out examples by minimising the negative
    log-likelihood of the true adapter, so p is a calibrated confidence); the top_k adapters by p
    are active on the row with weights p renormalised over them (weights below min_weight dropped).
An adapter the router may not use (deleted or replaced in the store since fitting) is never chosen:
if it is the nearest, the row goes to the fallback and the decision says why.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import Adapter
from ..errors import ConfigError
from .common import (AdapterRecord, Decision, check_adapters, check_base, check_prompts, check_router_name,
                     check_top_k, now, records_from_meta, save_router, verify_router)
from .encoder import Encoder
from .lexical import Lexical, cosine, mean_rows, pack_rows, transpose, unpack_rows

TYPE = "adapterkit.router.retrieval"
TEMPERATURES = torch.logspace(math.log10(0.002), math.log10(2.0), 121)   # the grid T is fitted on
LEXICAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)                              # the grid w is chosen from


@dataclass
class RetrievalRouter:
    name: str
    records: list[AdapterRecord]
    descriptors: torch.Tensor         # [n, H] unit rows, in the centered space
    center: torch.Tensor              # [H]
    temperature: float
    threshold: float                  # min typicality (below: fallback)
    encoder_spec: dict[str, Any]
    top_k: int = 1
    min_weight: float = 0.05
    min_confidence: float = 0.0       # below: fallback (ambiguous between adapters); 0 = off
    fallback: AdapterRecord | None = None
    examples: dict[str, Any] = field(default_factory=dict)      # lineage: source, counts, hashes
    calibration: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=now)
    encoder: Encoder | None = None
    unusable: dict[str, str] = field(default_factory=dict)      # adapter -> why it may not be used
    kind: str = "retrieval"
    neighbors: int = 0                # k of the example-bank scoring; 0 = descriptors
    bank: torch.Tensor | None = None  # [M, H] unit rows (centered fit examples), when neighbors > 0
    bank_owner: torch.Tensor | None = None   # [M] long: adapter index of each bank row
    lexical: Lexical | None = None    # the lexical channel (None: dense only)
    lexical_weight: float = 0.0       # w in (dense + w * lexical) / (1 + w)
    lexical_rows: torch.Tensor | None = None   # sparse [M or n, BUCKETS]: bank rows, or descriptors
    _lexical_t: torch.Tensor | None = field(default=None, repr=False, compare=False)  # transpose, built once
    raw_bank: torch.Tensor | None = None     # [M, H] unit rows of the UNcentered fit examples (OOD typicality)

    score_word = "similarity"         # what a score is, in decisions' reasons (a class attribute)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    # ------------------------------------------------------------------ routing
    def similarities(self, embeddings: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        """embeddings [N, H] (and the N texts, for the lexical channel) -> scores [N, n]: cosine
        similarities to the adapters (mixed with the lexical cosines when the router has them)."""
        z = torch.nn.functional.normalize(embeddings.float() - self.center, dim=-1)
        dense = self._score(z @ (self.bank if self._knn else self.descriptors).t())
        if self.lexical is None or not self.lexical_weight:
            return dense
        if texts is None or len(texts) != embeddings.shape[0]:
            raise ConfigError(f"router {self.name!r} has a lexical channel: pass the texts with their embeddings")
        lex = self._score(self._lexical_cosine(texts))
        return (dense + self.lexical_weight * lex) / (1.0 + self.lexical_weight)

    def _lexical_cosine(self, texts: Sequence[str]) -> torch.Tensor:
        """Lexical cosines [N, M or n] of the texts to the lexical rows."""
        if self._lexical_t is None:
            self._lexical_t = transpose(self.lexical_rows)
        return cosine(self.lexical.vectors(texts), self._lexical_t)

    @property
    def _knn(self) -> bool:
        return bool(self.neighbors) and self.bank is not None

    def _score(self, sims: torch.Tensor) -> torch.Tensor:
        """Cosines to the bank [N, M] -> mean of each adapter's k nearest [N, n]; to descriptors: as is."""
        if not self._knn:
            return sims
        cols = []
        for j in range(len(self.records)):
            own = sims[:, self.bank_owner == j]                             # [N, m_j]
            cols.append(own.topk(min(self.neighbors, own.shape[1]), dim=1).values.mean(1))
        return torch.stack(cols, 1)

    def typicality(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """[N]: mean cosine of the uncentered embeddings to their k nearest fit examples (None
        without a raw bank: the OOD test then reads max_a sims)."""
        if self.raw_bank is None or not self.neighbors:
            return None
        z = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        return (z @ self.raw_bank.t()).topk(min(self.neighbors, self.raw_bank.shape[0]), dim=1).values.mean(1)

    def route(self, texts: Sequence[Any]) -> list[Decision]:
        """One Decision per prompt (per image, for a router over an image base's features). Raises
        EmptyPromptError for an empty/whitespace prompt."""
        if self.encoder is None:
            raise ConfigError(f"router {self.name!r} has no encoder attached; load it with load_router(...)")
        texts = list(texts) if getattr(self.encoder, "images", False) else check_prompts(texts)
        emb = self.encoder.embed(texts)
        sims = self.similarities(emb, texts)
        return self.decide(sims, self.typicality(emb))

    def decide(self, sims: torch.Tensor, typicality: torch.Tensor | None = None) -> list[Decision]:
        """sims [N, n] (and typicality [N], default: max_a sims) -> one Decision per row (pure: no
        model involved)."""
        if typicality is None:
            return [self._decide_row(row) for row in sims]
        return [self._decide_row(row, float(t)) for row, t in zip(sims, typicality)]

    def _decide_row(self, s: torch.Tensor, typical: float | None = None) -> Decision:
        names = self.names
        scores = {n: round(float(v), 6) for n, v in zip(names, s)}
        usable = torch.tensor([n not in self.unusable for n in names])
        nearest = int(s.argmax())
        if not usable.any():
            return self._fallback(scores, 0.0, "no adapter of this router is usable: "
                                  + "; ".join(self.unusable.values()))
        probs = torch.softmax(torch.where(usable, s, torch.tensor(-math.inf)) / self.temperature, dim=0)
        if names[nearest] in self.unusable:
            return self._fallback(scores, 0.0, f"the nearest adapter is unusable: {self.unusable[names[nearest]]}")
        conf = float(probs[nearest])
        if typical is None and float(s[nearest]) < self.threshold:
            return self._fallback(scores, conf, (
                f"out of distribution: the nearest adapter {names[nearest]!r} has {self.score_word} "
                f"{float(s[nearest]):.3f} < threshold {self.threshold:.3f}"))
        if typical is not None and typical < self.threshold:
            return self._fallback(scores, conf, (
                f"out of distribution: the mean similarity to the {self.neighbors} nearest examples is "
                f"{typical:.3f} < threshold {self.threshold:.3f} (nearest adapter {names[nearest]!r})"))
        if conf < self.min_confidence:
            return self._fallback(scores, conf, (
                f"ambiguous: the nearest adapter {names[nearest]!r} has confidence {conf:.3f} < "
                f"min_confidence {self.min_confidence:.3f}"))
        k = min(self.top_k, int(usable.sum()))
        top_p, top_i = probs.topk(k)
        weights = top_p / top_p.sum()
        keep = (weights >= self.min_weight) | (torch.arange(k) == 0)
        weights = weights[keep] / weights[keep].sum()
        chosen = {names[int(i)]: round(float(w), 6) for i, w in zip(top_i[keep], weights)}
        return Decision(chosen, scores, conf, False,
                        f"nearest adapter {names[nearest]!r}: {self.score_word} {float(s[nearest]):.3f}"
                        + (f", typicality {typical:.3f}" if typical is not None else "")
                        + f" >= threshold {self.threshold:.3f}, confidence {conf:.3f}")

    def _fallback(self, scores: dict[str, float], conf: float, why: str) -> Decision:
        if self.fallback is not None and self.fallback.name not in self.unusable:
            return Decision({self.fallback.name: 1.0}, scores, conf, True, f"{why}; served by the fallback "
                            f"adapter {self.fallback.name!r}")
        return Decision({}, scores, conf, True, f"{why}; served by the base model")

    # ------------------------------------------------------------------ checks
    def check_base(self, fingerprint: str | None, base_name: str | None = None) -> None:
        """Raise BaseMismatchError unless the router's adapters belong to this base."""
        check_base(self.records + ([self.fallback] if self.fallback else []), fingerprint, base_name)

    def verify(self, store: Any, *, strict: bool = True) -> dict[str, str]:
        """Compare the recorded adapters with the store. strict: raise StaleRouterError naming them;
        else mark them unusable (never chosen, decisions say why) and return {name: why}."""
        return verify_router(self, self.records + ([self.fallback] if self.fallback else []), store, strict)

    # ------------------------------------------------------------------ artifact
    def to_meta(self) -> dict[str, Any]:
        return {"type": TYPE, "format_version": 1, "kind": self.kind, "name": self.name,
                "adapters": [vars(r) for r in self.records],
                "fallback": vars(self.fallback) if self.fallback else None,
                "encoder": self.encoder_spec, "temperature": self.temperature, "threshold": self.threshold,
                "top_k": self.top_k, "min_weight": self.min_weight, "min_confidence": self.min_confidence,
                "neighbors": self.neighbors,
                "ood": "knn-uncentered" if self.raw_bank is not None else "max-score",
                "lexical": self._lexical_meta(),
                "examples": self.examples, "calibration": self.calibration, "created": self.created}

    def _lexical_meta(self) -> dict[str, Any] | None:
        return ({**self.lexical.spec(), "weight": self.lexical_weight, "rows": int(self.lexical_rows.shape[0])}
                if self.lexical is not None else None)

    def save(self, store: Any, *, overwrite: bool = False):
        check_router_name(store, self.name, overwrite)
        tensors = {"descriptors": self.descriptors, "center": self.center}
        if self.neighbors and self.bank is not None:
            tensors.update(bank=self.bank, bank_owner=self.bank_owner)
        if self.raw_bank is not None:
            tensors["raw_bank"] = self.raw_bank
        if self.lexical is not None:
            tensors.update(self.lexical.tensors(), **pack_rows(self.lexical_rows, "lexical_rows"))
        return save_router(store, self.name, self.to_meta(), tensors)

    @classmethod
    def from_artifact(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                      encoder: Encoder | None) -> "RetrievalRouter":
        if encoder is not None:
            encoder.check(meta["encoder"])
        fb = meta.get("fallback")
        lex = meta.get("lexical")
        router = cls(meta["name"], records_from_meta(meta), tensors["descriptors"].float(), tensors["center"].float(),
                   float(meta["temperature"]), float(meta["threshold"]), meta["encoder"], int(meta["top_k"]),
                   float(meta["min_weight"]), float(meta.get("min_confidence", 0.0)),
                   AdapterRecord(**fb) if fb else None, meta.get("examples", {}), meta.get("calibration", {}),
                   meta.get("created", ""), encoder, neighbors=int(meta.get("neighbors", 0)),
                   bank=tensors["bank"].float() if "bank" in tensors else None,
                   bank_owner=tensors["bank_owner"].long() if "bank_owner" in tensors else None,
                   raw_bank=tensors["raw_bank"].float() if "raw_bank" in tensors else None)
        if lex:
            router.lexical = Lexical.from_artifact(lex, tensors)
            router.lexical_weight = float(lex["weight"])
            router.lexical_rows = unpack_rows(tensors, "lexical_rows", int(lex["rows"]))
            router._lexical_t = transpose(router.lexical_rows)
        return router


# ---------------------------------------------------------------------------- fitting
def _split(texts: Sequence[str], seed: str, share: float = 0.2) -> tuple[list[str], list[str]]:
    items = list(texts)
    random.Random(seed).shuffle(items)
    n_out = max(1, round(share * len(items)))
    return items[n_out:], items[:n_out]


def texts_hash(texts: Sequence[Any]) -> str:
    """A digest of example texts (or images: a file path's or data URL's text, a decoded image's pixels)."""
    h = hashlib.sha256()
    for t in texts:
        h.update((t.encode("utf-8") if isinstance(t, str) else t.tobytes()) + b"\0")
    return "sha256:" + h.hexdigest()[:16]


def _usable(t: Any) -> bool:
    """An example a router can fit on: a non-blank text, or an image."""
    return bool(t.strip()) if isinstance(t, str) else t is not None


def fit_temperature(sims: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor = TEMPERATURES) -> float:
    """argmin over the grid of the NLL of softmax(sims / T) at the true labels."""
    nll = torch.stack([torch.nn.functional.cross_entropy(sims / t, labels) for t in grid])
    return float(grid[int(nll.argmin())])


def ood_threshold(typical: torch.Tensor, coverage: float) -> float:
    """The (1 - coverage) quantile of the held-out examples' typicality: a share `coverage` passes."""
    return float(torch.quantile(typical, 1.0 - coverage, interpolation="lower")) if coverage < 1 else \
        float(typical.min())


def fit_retrieval(
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
    lexical_weight: float | None = None,
) -> RetrievalRouter:
    """A retrieval router over `adapters` from example texts per adapter name (`examples`), calibrated
    on `held_out` texts per adapter (default: a seeded 20 % of `examples`). lexical: add the
    character n-gram channel, its weight chosen on the held-out texts (or fixed by lexical_weight)."""
    records = check_adapters(adapters)
    names = [r.name for r in records]
    if getattr(encoder, "images", False):     # character n-grams of images mean nothing: the channel is off
        if lexical_weight is not None:
            raise ConfigError("--lexical-weight weighs character n-grams of texts; a router over an image base's "
                              "features has no lexical channel: leave it out")
        lexical = False
    check_options(names, top_k=top_k, coverage=coverage, min_weight=min_weight, neighbors=neighbors,
                  lexical=lexical, lexical_weight=lexical_weight)
    fit_texts, cal_texts = split_examples(names, examples, held_out, "a retrieval router")
    per = {n: encoder.embed(fit_texts[n]) for n in names}                  # n -> [m, H]
    center = torch.stack([e.mean(0) for e in per.values()]).mean(0)       # mean of per-adapter means
    descriptors = torch.stack([
        torch.nn.functional.normalize(torch.nn.functional.normalize(e - center, dim=-1).mean(0), dim=0)
        for e in per.values()])
    router = RetrievalRouter(name, records, descriptors, center, 1.0, -1.0, encoder.spec(), top_k, min_weight,
                             min_confidence, AdapterRecord.of(fallback) if fallback is not None else None,
                             encoder=encoder, neighbors=neighbors)
    if neighbors:
        router.bank = torch.nn.functional.normalize(torch.cat(list(per.values())) - center, dim=-1)
        router.bank_owner = torch.tensor([j for j, e in enumerate(per.values()) for _ in range(len(e))])
        router.raw_bank = torch.nn.functional.normalize(torch.cat(list(per.values())), dim=-1)
    cal_emb = torch.cat([encoder.embed(cal_texts[n]) for n in names])
    labels = torch.tensor([i for i, n in enumerate(names) for _ in cal_texts[n]])
    sims = router.similarities(cal_emb)
    grid: dict[str, float] = {}
    if lexical:
        flat_fit = [t for n in names for t in fit_texts[n]]
        router.lexical = Lexical.fit(flat_fit)
        rows = router.lexical.vectors(flat_fit)
        router.lexical_rows = rows if neighbors else mean_rows(rows, torch.tensor(
            [j for j, n in enumerate(names) for _ in fit_texts[n]]), len(names))
        lex = router._score(router._lexical_cosine([t for n in names for t in cal_texts[n]]))
        sims, router.lexical_weight, grid = _choose_lexical_weight(
            sims, lex, labels, LEXICAL_WEIGHTS if lexical_weight is None else (lexical_weight,))
        if not router.lexical_weight:
            router.lexical = router.lexical_rows = router._lexical_t = None
    router.temperature = fit_temperature(sims, labels)
    typical = router.typicality(cal_emb)
    best = sims.max(1).values if typical is None else typical
    router.threshold = ood_threshold(best, coverage)
    router.calibration = calibration(sims, labels, router.temperature, best >= router.threshold, coverage,
                                     {n: len(cal_texts[n]) for n in names})
    router.calibration.update({"lexical_weight": router.lexical_weight, "lexical_weight_accuracy": grid})
    router.examples = examples_lineage(source, names, fit_texts, cal_texts)
    return router


def split_examples(names: Sequence[str], examples: Mapping[str, Sequence[str]],
                   held_out: Mapping[str, Sequence[str]] | None, what: str) -> tuple[dict, dict]:
    """({adapter: fit texts}, {adapter: calibration texts}): the held-out texts given, or a seeded 20 %
    of each adapter's examples. Refuses adapters without examples and examples of unknown adapters."""
    missing = [n for n in names if len([t for t in examples.get(n, ()) if _usable(t)]) < (1 if held_out else 2)]
    if missing:
        raise ConfigError(f"no example texts for adapter(s) {missing} ({what} needs >= 2 per adapter); "
                          "give the adapters a task in the store or pass --examples FILE")
    unknown = sorted(set(examples) - set(names))
    if unknown:
        raise ConfigError(f"examples name adapter(s) {unknown} that are not in the router's adapters {list(names)}")
    fit_texts, cal_texts = {}, {}
    for n in names:
        texts = [t for t in examples[n] if _usable(t)]
        if held_out is None:
            fit_texts[n], cal_texts[n] = _split(texts, f"adapterkit:route:{n}")
        else:
            fit_texts[n], cal_texts[n] = texts, [t for t in held_out.get(n, ()) if _usable(t)]
            if not cal_texts[n]:
                raise ConfigError(f"no held-out texts for adapter {n!r}; give some or omit held_out")
    return fit_texts, cal_texts


def calibration(scores: torch.Tensor, labels: torch.Tensor, temperature: float, passed: torch.Tensor,
                coverage: float, held: dict[str, int]) -> dict[str, Any]:
    """What the held-out examples say about a fitted router: accuracy, coverage, confidence, NLL, ECE."""
    probs = torch.softmax(scores / temperature, 1)
    conf, pred = probs.max(1)
    return {"held_out": held,
            "accuracy": round(float((pred == labels).float().mean()), 6),
            "coverage_target": coverage,
            "coverage": round(float(passed.float().mean()), 6),
            "mean_confidence": round(float(conf.mean()), 6),
            "nll": round(float(torch.nn.functional.cross_entropy(scores / temperature, labels)), 6),
            "ece": round(_ece(conf, pred == labels), 6)}


def examples_lineage(source: str, names: Sequence[str], fit_texts: Mapping[str, Sequence[str]],
                     cal_texts: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    return {"source": source,
            "fit": {n: {"count": len(fit_texts[n]), "sha256": texts_hash(fit_texts[n])} for n in names},
            "held_out": {n: {"count": len(cal_texts[n]), "sha256": texts_hash(cal_texts[n])} for n in names}}


def check_options(names: Sequence[str], *, top_k: int = 1, coverage: float = 0.99, min_weight: float = 0.05,
                  neighbors: int = 10, lexical: bool = True, lexical_weight: float | None = None) -> None:
    """fit_retrieval's options, checked before any embedding (fit_router calls it first too)."""
    if isinstance(coverage, bool) or not isinstance(coverage, numbers.Real) or not 0.0 < coverage <= 1.0:
        raise ConfigError(f"coverage must be in (0, 1] (the share of in-task prompts that must pass), got {coverage}")
    check_top_k(top_k, names)
    if isinstance(min_weight, bool) or not isinstance(min_weight, numbers.Real) or not 0.0 <= min_weight < 1.0:
        raise ConfigError(f"min_weight must be in [0, 1), got {min_weight}")
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or neighbors < 0:
        raise ConfigError(f"neighbors must be an integer >= 0 (0: one descriptor per adapter), got {neighbors!r}")
    check_lexical(lexical, lexical_weight)


def check_lexical(lexical: bool, lexical_weight: float | None) -> None:
    if lexical_weight is not None and not (lexical and 0.0 <= lexical_weight < math.inf):
        raise ConfigError(f"lexical_weight must be a finite number >= 0 with the lexical channel on, got {lexical_weight!r}")


def _choose_lexical_weight(dense: torch.Tensor, lex: torch.Tensor, labels: torch.Tensor,
                           weights: Sequence[float]) -> tuple[torch.Tensor, float, dict[str, float]]:
    """The mix (dense + w * lex) / (1 + w) with the best held-out accuracy (ties: the lowest NLL at
    its fitted temperature); returns (mixed scores, w, {w: held-out accuracy})."""
    best, grid = None, {}
    for w in weights:
        s = (dense + w * lex) / (1.0 + w)
        acc = float((s.argmax(1) == labels).float().mean())
        nll = float(torch.nn.functional.cross_entropy(s / fit_temperature(s, labels), labels))
        grid[str(w)] = round(acc, 6)
        if best is None or (acc, -nll) > best[0]:
            best = ((acc, -nll), s, float(w))
    return best[1], best[2], grid


def _ece(conf: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error over equal-width confidence bins."""
    total = 0.0
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += float(m.float().mean()) * abs(float(conf[m].mean()) - float(correct[m].float().mean()))
    return total
