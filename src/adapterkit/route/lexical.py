"""The lexical channel of the retrieval router: hashed character n-gram TF-IDF vectors.

A sentence encoder reads meaning; tasks also differ in form (tweets carry @handles, URLs and
hashtags; trivia questions start "Which ..."; reviews quote titles). A prompt like "It bites hard."
is semantically closer to chit-chat than to a movie review, but its character n-grams are not. The
router scores each adapter on both channels and mixes them (hybrid dense + sparse retrieval, as in
BM25 + embedding search).

Text -> vector [BUCKETS] (sparse):
    s = " " + " ".join(text.split()) + " "                   case kept (capitals, @, # carry signal)
    every character n-gram g of s with n in [1, 4] -> bucket crc32(g) mod BUCKETS (stable across runs)
    tf(b) = 1 + log(count of n-grams in bucket b);  x(b) = tf(b) * idf(b);  x / ||x||
    idf(b) = log((1 + M) / (1 + df(b))) + 1   over the M fit texts (unseen buckets: df = 0)

Similarities between such vectors are cosines in [0, 1] (all entries are >= 0).
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

# torch.sparse.mm(COO, COO) goes through CSR internally and warns that CSR is "beta" on every call.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

BUCKETS = 1 << 20
NGRAMS = (1, 4)


def _counts(text: str, lo: int, hi: int) -> dict[int, int]:
    out: dict[int, int] = {}
    words = " ".join(text.split())
    if not words:                      # whitespace only: no n-grams (a zero vector)
        return out
    s = " " + words + " "
    for n in range(lo, hi + 1):
        for i in range(len(s) - n + 1):
            b = zlib.crc32(s[i:i + n].encode("utf-8")) & (BUCKETS - 1)
            out[b] = out.get(b, 0) + 1
    return out


def term_frequencies(texts: Sequence[str], ngrams: tuple[int, int] = NGRAMS) -> torch.Tensor:
    """Sparse COO [N, BUCKETS] of 1 + log(count) per bucket (no idf, not normalised)."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, text in enumerate(texts):
        for b, c in _counts(text, *ngrams).items():
            rows.append(i)
            cols.append(b)
            vals.append(1.0 + math.log(c))
    return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                   torch.tensor(vals, dtype=torch.float32), (len(texts), BUCKETS),
                                   check_invariants=False).coalesce()


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Sparse COO [N, D] -> the same rows with unit L2 norm (empty rows stay empty)."""
    x = x.coalesce()
    idx, val = x.indices(), x.values()
    norm = torch.zeros(x.shape[0]).index_add_(0, idx[0], val * val).sqrt().clamp(min=1e-12)
    return torch.sparse_coo_tensor(idx, val / norm[idx[0]], x.shape, check_invariants=False).coalesce()


@dataclass
class Lexical:
    """The idf of the fit texts; turns texts into unit TF-IDF rows."""

    idf_buckets: torch.Tensor        # [U] long: buckets seen in the fit texts
    idf_values: torch.Tensor         # [U] float: their idf
    unseen_idf: float                # idf of a bucket no fit text has
    ngrams: tuple[int, int] = NGRAMS
    _dense: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)   # idf() built once

    @classmethod
    def fit(cls, texts: Sequence[str], ngrams: tuple[int, int] = NGRAMS) -> "Lexical":
        tf = term_frequencies(texts, ngrams)
        df = torch.bincount(tf.indices()[1], minlength=BUCKETS)
        seen = df.nonzero().flatten()
        m = len(texts)
        idf = torch.log((1.0 + m) / (1.0 + df[seen].float())) + 1.0
        return cls(seen, idf, math.log(1.0 + m) + 1.0, ngrams)

    def idf(self) -> torch.Tensor:
        """Dense [BUCKETS] idf (4 MiB, built on first use: vectors() runs per routed prompt)."""
        if self._dense is None:
            out = torch.full((BUCKETS,), self.unseen_idf)
            out[self.idf_buckets] = self.idf_values
            self._dense = out
        return self._dense

    def vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> sparse COO [N, BUCKETS] unit TF-IDF rows."""
        tf = term_frequencies(texts, self.ngrams)
        idx = tf.indices()
        weighted = torch.sparse_coo_tensor(idx, tf.values() * self.idf()[idx[1]], tf.shape, check_invariants=False)
        return normalize_rows(weighted)

    def spec(self) -> dict[str, Any]:
        return {"kind": "char-ngram-tfidf", "ngrams": list(self.ngrams), "buckets": BUCKETS,
                "hash": "crc32", "unseen_idf": self.unseen_idf}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lexical_idf_buckets": self.idf_buckets, "lexical_idf": self.idf_values}

    @classmethod
    def from_artifact(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Lexical":
        if spec.get("buckets") != BUCKETS or spec.get("hash") != "crc32":
            from ..errors import CorruptAdapterError

            raise CorruptAdapterError(f"the router's lexical channel uses {spec.get('buckets')} {spec.get('hash')} "
                                      f"buckets; this adapterkit hashes into {BUCKETS} crc32 buckets: refit the router")
        return cls(tensors["lexical_idf_buckets"].long(), tensors["lexical_idf"].float(), float(spec["unseen_idf"]),
                   tuple(spec["ngrams"]))


# ---------------------------------------------------------------------------- sparse rows in safetensors
def pack_rows(x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Sparse COO [N, D] -> plain tensors (safetensors holds no sparse tensors): row, col, value."""
    x = x.coalesce()
    return {f"{prefix}_row": x.indices()[0].int(), f"{prefix}_col": x.indices()[1].int(),
            f"{prefix}_val": x.values().float()}


def unpack_rows(tensors: dict[str, torch.Tensor], prefix: str, rows: int) -> torch.Tensor:
    """The inverse of pack_rows: sparse COO [rows, BUCKETS]."""
    idx = torch.stack([tensors[f"{prefix}_row"].long(), tensors[f"{prefix}_col"].long()])
    return torch.sparse_coo_tensor(idx, tensors[f"{prefix}_val"].float(), (rows, BUCKETS),
                                   check_invariants=True).coalesce()


def transpose(rows: torch.Tensor) -> torch.Tensor:
    """Sparse rows [M, D] -> the coalesced transpose [D, M] that cosine() takes (build it once:
    transposing a 4096-example bank costs ~70 ms, the product with one prompt ~2 ms)."""
    return rows.t().coalesce()


def cosine(queries: torch.Tensor, rows_t: torch.Tensor) -> torch.Tensor:
    """Sparse unit rows [N, D] x transposed sparse unit rows [D, M] -> dense cosines [N, M]."""
    return torch.sparse.mm(queries.coalesce(), rows_t).to_dense()


def mean_rows(x: torch.Tensor, owner: torch.Tensor, groups: int) -> torch.Tensor:
    """Sparse unit rows [M, D] with owner [M] -> sparse [groups, D]: each group's normalised mean."""
    m = owner.shape[0]
    onehot = torch.sparse_coo_tensor(torch.stack([owner, torch.arange(m)]), torch.ones(m), (groups, m),
                                     check_invariants=False)
    return normalize_rows(torch.sparse.mm(onehot.coalesce(), x.coalesce()))
