"""Serving vision-language adapters (train/vqa.py) on a language base: images in a chat become image-base
features here (the image base named by the adapter's projector, loaded once and kept frozen), and the
engine projects them with the projector of the adapter version it acquires, so a replaced adapter never
reads its predecessor's projection.

Several VL adapters (per-task ones, a shared one) and text adapters share one batch: the image tokens are
only the first step's input embeddings; every later computation is the engine's usual mixed batch."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch

from ..errors import BaseMismatchError, ConfigError
from ..vision.images import image_pixels
from ..vision.projector import ImageProjector, grid_features
from .classify import SourceCache, read_head
from .requests import ImageInput


def _read_projector(source: Any) -> Optional[ImageProjector]:
    head = read_head(source, "image projector")
    if not isinstance(head, ImageProjector):
        return None
    for t in head.params():
        if not torch.isfinite(t).all():
            from ..errors import CorruptAdapterError

            raise CorruptAdapterError(f"adapter {source.name!r}: its image projector holds NaN or inf; re-train it")
    return head


class ProjectorCache(SourceCache):
    """The image projector per adapter version; `kind` is None for an adapter without one (text-only)."""

    def __init__(self, size: int = 256) -> None:
        super().__init__(_read_projector, size)

    def get(self, source: Any) -> ImageProjector:
        found = self.kind(source)
        if found is None:
            raise ConfigError(f"adapter {source.name!r} is text-only (it has no image projector): send images to a "
                              "vision-language adapter (trained on an image task such as easy-vqa-colour)")
        return found


def project(projector: ImageProjector, images: ImageInput, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [k] long, image tokens [k, d]) for a request's images, by the acquired version's projector."""
    if images.image_fingerprint != projector.feature_source():
        raise BaseMismatchError(f"the images were read by another image base (or image adapter) than this adapter's "
                                f"projector reads ({projector.image_base}); the adapter was replaced while the "
                                "request waited: send it again")
    if projector.width != width:
        raise BaseMismatchError(f"the adapter's projector writes {projector.width}-wide image tokens but the base's "
                                f"embeddings are {width} wide; load the adapter onto its own base")
    n = projector.n_tokens
    feats = images.features.reshape(-1, n, images.features.shape[-1])
    return torch.tensor(images.slots, dtype=torch.long), projector.tokens(feats).reshape(-1, projector.width)


class ImageReader:
    """Image bases, loaded on first use (by the name a projector records) and checked by fingerprint, and
    their grid features of decoded images, through the projector's image adapter when it has one (kept
    attached, at most `adapters` per image base, least recently used out). Thread-safe: one image forward
    at a time (a runtime's batch context is shared)."""

    def __init__(self, device: Any = "cpu", adapters: int = 8) -> None:
        self.device = device
        self.adapters = adapters
        self._bases: dict[str, Any] = {}
        self._runtimes: dict[str, Any] = {}
        self._recent: dict[str, OrderedDict[str, None]] = {}      # per image base: attached keys, oldest first
        self._lock = threading.Lock()
        self._run = threading.Lock()

    def base(self, projector: ImageProjector) -> Any:
        from ..core.base import load_base

        with self._lock:
            base = self._bases.get(projector.image_base)
            if base is None:
                base = load_base(projector.image_base, device=self.device)
                if base.kind != "image":
                    raise BaseMismatchError(f"the adapter's projector names {projector.image_base!r} as its image "
                                            f"base, which is a {base.kind} model here")
                self._bases[projector.image_base] = base
        projector.check_image_base(base.name, base.fingerprint)
        return base

    @torch.inference_mode()
    def read(self, projector: ImageProjector, images: Sequence[Any]) -> tuple[torch.Tensor, str]:
        """images (data URLs, bytes, decoded) -> (features [m * n, C] on the host, what made them: the
        projector's feature_source()). A bad image raises ImageError naming it ("image 1")."""
        base = self.base(projector)
        px = torch.stack([image_pixels(im, base.processor, f"image {i}") for i, im in enumerate(images)])
        px = px.to(base.device)
        with self._run:
            if projector.image_adapter is None:
                feats = grid_features(base.model, px, projector.grid)                   # [m, n, C]
            else:
                rt, key = self._attached(base, projector)
                with rt.batch([key] * px.shape[0]):
                    feats = grid_features(base.model, px, projector.grid)
        return feats.reshape(-1, feats.shape[-1]).cpu(), projector.feature_source()

    def _attached(self, base: Any, projector: ImageProjector) -> tuple[Any, str]:
        """(the image base's runtime, the key of the projector's image adapter on it), attaching it if needed."""
        from ..core.runtime import AdapterRuntime

        rt = self._runtimes.get(base.name)
        if rt is None:
            rt = self._runtimes[base.name] = AdapterRuntime.from_base(base, capacity=self.adapters)
        recent = self._recent.setdefault(base.name, OrderedDict())
        key = projector.feature_source().rsplit("+", 1)[1][:24]        # the adapter's content fingerprint
        if key in recent:
            recent.move_to_end(key)
        else:
            while len(recent) >= self.adapters:
                rt.remove(recent.popitem(last=False)[0])
            rt.add(projector.image_adapter, key=key)
            recent[key] = None
        return rt, key
