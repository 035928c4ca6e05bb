"""Images in: decode (files, bytes, data URLs) with clear errors, then the base's own preprocessing
(ImageSpec: shorter side resized, centre crop, normalised), as torchvision's eval transforms do.

Bad input is refused by ImageError naming the problem: bytes that are not an image, an image over the
pixel limit (a decompression bomb is refused before it is decoded), an unknown data-URL type."""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import AdapterkitError
from .mobilenet import ImageSpec

MAX_PIXELS = 40_000_000          # width x height; above it an image is refused (PIL's bomb guard is 89 M)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")   # the decoders untrusted bytes may reach (not EPS, WMF, ...)
MAX_BYTES = 20 * 2 ** 20         # encoded size
_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.+-]+)*;base64,(.*)$", re.I | re.S)


class ImageError(AdapterkitError, ValueError):
    """An image that cannot be used: not decodable, too large, or of an unsupported kind. HTTP 400."""


def decode(data: bytes | str | Path, where: str = "image") -> Any:
    """An RGB PIL image from encoded bytes, a file path or a `data:image/...;base64,` URL."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, Path) or (isinstance(data, str) and not data.startswith("data:")):
        path = Path(data)
        if not path.is_file():
            raise ImageError(f"{where}: no image file at {str(path)!r}")
        data = path.read_bytes()
    elif isinstance(data, str):
        data = from_data_url(data, where)
    if len(data) > MAX_BYTES:
        raise ImageError(f"{where}: {len(data):,} bytes is over the {MAX_BYTES:,}-byte limit; send a smaller "
                         "image (it is resized to the base's input size anyway)")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{where}: {w}x{h} pixels is over the {MAX_PIXELS:,}-pixel limit; downscale it first")
        img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{where}: not a decodable image ({type(exc).__name__}: {exc}); send PNG, JPEG, "
                         "GIF, BMP or WebP bytes") from None
    return img.convert("RGB")


def from_data_url(url: str, where: str = "image") -> bytes:
    """The bytes of a base64 `data:image/...` URL (what the OpenAI API's image_url carries)."""
    m = _DATA_URL.match(url.strip())
    if m is None:
        raise ImageError(f"{where}: a data URL must look like data:image/png;base64,<bytes>; got "
                         f"{url[:40]!r}...")
    if m.group(1) is None:
        raise ImageError(f"{where}: the data URL has no image media type (data:image/png;base64,...)")
    try:
        return base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data URL's base64 payload is malformed") from None


def preprocess(img: Any, spec: ImageSpec) -> torch.Tensor:
    """RGB PIL image -> normalised float32 [3, crop, crop]: shorter side to spec.resize (bilinear,
    antialiased), centre crop, /255, (x - mean) / std."""
    from PIL import Image

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.resize, int(spec.resize * long / short)      # torchvision's rounding
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize(size, Image.BILINEAR, reducing_gap=None)
    w, h = img.size
    if min(w, h) < spec.crop:
        raise ImageError(f"resize {spec.resize} is below crop {spec.crop}: the base's image config is inconsistent")
    left, top = int(round((w - spec.crop) / 2.0)), int(round((h - spec.crop) / 2.0))
    img = img.crop((left, top, left + spec.crop, top + spec.crop))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(spec.crop, spec.crop, 3)
    x = x.permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def pixels(images: Sequence[Any], spec: Any) -> torch.Tensor:
    """A batch [n, 3, H, W] from decoded images, paths, bytes or data URLs, preprocessed as the base says:
    `spec` an ImageSpec (adapterkit's MobileNetV2) or a transformers image processor (a ViT / CLIP folder)."""
    return torch.stack([image_pixels(im, spec, f"image {i}") for i, im in enumerate(images)])


def image_pixels(image: Any, spec: Any, where: str = "image") -> torch.Tensor:
    """One image (decoded, path, bytes or data URL; a tensor [3, H, W] is taken as already preprocessed)
    -> [3, H, W]; the decoded image is dropped at once (a batch never holds every decoded photo)."""
    if isinstance(image, torch.Tensor):
        return image
    img = image if hasattr(image, "size") and hasattr(image, "mode") else decode(image, where)
    img = img if img.mode == "RGB" else img.convert("RGB")
    if not isinstance(spec, ImageSpec):
        from .hf import hf_pixels

        return hf_pixels([img], spec)[0]
    return preprocess(img, spec)
