"""Routers: choose adapters from the input itself, so a request need not name one.

    retrieval.py   training-free: nearest adapter examples / descriptor (embeddings), calibrated
                   confidence, OOD threshold -> fallback; top-k rows with weights
    linear.py      learned per prompt: logistic regression over the embedding + character n-grams,
                   calibrated, with the retrieval router's OOD fallback and top-k
    lexical.py     character n-gram TF-IDF (the prompt's form): retrieval's second channel, linear's features
    gate.py        learned MeteoRA-style per-layer gate: top-k adapters per token, mixed-batch kernels
    common.py      Decision, typed errors, adapter records (content fingerprints), store artifacts
    evaluate.py    routing accuracy, confusion matrix (table + PNG), end-to-end accuracy vs the oracle

    router = load_router(store, "auto", encoder=Encoder.from_base(base, runtime=rt))
    [d] = router.route(["what a wonderful film"])    # d.adapters == {"sentiment": 1.0}, d.fallback False
"""

from __future__ import annotations

from typing import Any

from .common import (AUTO, AdapterRecord, Decision, EmptyPromptError, RouterNotFoundError, StaleRouterError,
                     default_router, list_routers, read_router, set_default_router)
from .encoder import Encoder
from .gate import GateRouter, train_gate
from .retrieval import RetrievalRouter, fit_retrieval
from .retrieval import TYPE as RETRIEVAL_TYPE
from .gate import TYPE as GATE_TYPE
from .linear import LinearRouter, fit_linear
from .linear import TYPE as LINEAR_TYPE

ENCODER_TYPES = (RETRIEVAL_TYPE, LINEAR_TYPE)      # per-prompt routers that read a sentence encoder

__all__ = ["AUTO", "ENCODER_TYPES", "GATE_TYPE", "LINEAR_TYPE", "RETRIEVAL_TYPE", "AdapterRecord", "Decision",
           "EmptyPromptError", "Encoder", "GateRouter", "LinearRouter", "RetrievalRouter", "RouterNotFoundError",
           "StaleRouterError", "default_router", "fit_linear", "fit_retrieval", "list_routers", "load_router",
           "set_default_router", "train_gate"]


def load_router(store: Any, name: str = AUTO, *, encoder: Encoder | None = None, strict: bool = True,
                verify: bool = True) -> RetrievalRouter | LinearRouter | GateRouter:
    """The stored router `name` ("auto": the store's default router).

    Retrieval and linear: `encoder` (default: load the encoder the router was fitted with by name) must have the
    recorded fingerprint. verify: compare every adapter with the store; strict raises
    StaleRouterError naming the deleted/replaced ones, non-strict marks them unusable (never chosen;
    decisions that would have chosen them fall back and say why)."""
    meta, tensors = read_router(store, name)
    if meta["type"] in ENCODER_TYPES:
        if encoder is None:
            encoder = Encoder.load(meta["encoder"]["name"], max_length=int(meta["encoder"].get("max_length", 128)))
        cls = LinearRouter if meta["type"] == LINEAR_TYPE else RetrievalRouter
        router: RetrievalRouter | GateRouter = cls.from_artifact(meta, tensors, encoder)
    else:
        router = GateRouter.from_artifact(meta, tensors)
    if verify:
        router.verify(store, strict=strict)
    return router
