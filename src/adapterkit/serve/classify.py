"""Classification in the serving engine: a request with `classify=True` runs its prompt through the
base with its adapter (one prefill, batched with every other request of the step), pools the final
hidden states the way its head was trained (last token for decoders) and returns the head's label
and probabilities instead of generating.

Heads are read from the adapter's folder on first use and kept per adapter version (the serving
cache reads adapters without their heads: generation never needs one, so a damaged head fails only
classification requests). With the head comes the max_length the adapter was trained with: inputs
are cut there, as training cut them.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.adapter import SIDE_FILE
from ..errors import AdapterkitError, ConfigError, CorruptAdapterError
from ..core.heads import ClassificationHead, load_head


@dataclass(frozen=True)
class Classification:
    labels: tuple[str, ...]
    probs: tuple[float, ...]             # softmax of the head's logits, one per label

    @property
    def label(self) -> str:
        return self.labels[max(range(len(self.probs)), key=self.probs.__getitem__)]


@dataclass(frozen=True)
class Classifier:
    """What a classification request needs of its adapter."""

    head: ClassificationHead
    max_length: Optional[int]            # the training max_length (inputs longer were cut), if recorded


def classify(head: ClassificationHead, hidden: torch.Tensor) -> Classification:
    """hidden [n, H]: one sequence's final hidden states (any device) -> its label and probabilities.
    The head is read from disk to the host, so the pooling and the head run there."""
    hidden = hidden.float().cpu()
    mask = torch.ones(1, hidden.shape[0], dtype=torch.long)
    probs = head.logits(hidden[None], mask)[0].softmax(-1)
    if not torch.isfinite(probs).all():
        raise ArithmeticError("the classification head's output holds NaN or inf")
    return Classification(tuple(head.labels), tuple(float(p) for p in probs))


class SourceCache:
    """What `reader(source)` makes of an adapter Source (name, folder, version), read once per version, at most
    `size` kept. Thread-safe; reads run outside the lock."""

    def __init__(self, reader: Any, size: int = 256) -> None:
        self._reader = reader
        self._size = size
        self._items: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def kind(self, source: Any) -> Any:
        key = (source.name, str(source.path), source.version)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        found = self._reader(source)
        with self._lock:
            self._items[key] = found
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return found


class ClassifierCache(SourceCache):
    """Classifier (head + training max_length) per adapter version; `kind` is None without a classification head."""

    def __init__(self, size: int = 256) -> None:
        super().__init__(_read, size)

    def get(self, source: Any) -> Classifier:
        """The adapter's Classifier; ConfigError when it has none."""
        found = self.kind(source)
        if found is None:
            raise ConfigError(f"adapter {source.name!r} has no classification head (it was not trained with one); "
                              "classify with an adapter trained for a classification task, or generate with it")
        return found


def read_head(source: Any, what: str = "head") -> Any:
    """The head saved in the adapter's folder (any type), or None; CorruptAdapterError naming the adapter."""
    try:
        return load_head(source.path)
    except AdapterkitError as exc:
        raise CorruptAdapterError(f"adapter {source.name!r}: its {what} cannot be read ({exc})") from None
    except Exception as exc:
        raise CorruptAdapterError(f"adapter {source.name!r}: its {what} cannot be read "
                                  f"({type(exc).__name__}: {exc})") from None


def _read(source: Any) -> Optional[Classifier]:
    head = read_head(source, "classification head")
    if not isinstance(head, ClassificationHead):
        return None
    for what, t in (("weight", head.weight), ("bias", head.bias)):
        if not torch.isfinite(t).all():
            raise CorruptAdapterError(f"adapter {source.name!r}: its classification head's {what} holds NaN or inf; "
                                      "re-train the adapter")
    return Classifier(head, _trained_max_length(source.path / SIDE_FILE))


def _trained_max_length(side: Any) -> Optional[int]:
    try:
        lineage = json.loads(side.read_text(encoding="utf-8")).get("meta", {}).get("lineage", [])
    except (OSError, ValueError, AttributeError):
        return None
    for step in lineage if isinstance(lineage, list) else []:
        value = step.get("params", {}).get("max_length") if isinstance(step, dict) else None
        if step.get("op") == "train" and isinstance(value, int) and value > 0:
            return value
    return None
