"""The image base: torchvision's MobileNetV2 checkpoint run by adapterkit's own network, and images in
(decode errors, preprocessing)."""

import base64
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adapterkit import load_base
from adapterkit.errors import BaseNotAvailableError
from adapterkit.vision import images
from adapterkit.vision.images import ImageError, decode, pixels, preprocess
from adapterkit.vision.mobilenet import ImageSpec, MobileNetV2

PIL = pytest.importorskip("PIL.Image")


def photo(name: str) -> Path:
    spec = importlib.util.find_spec("skimage")         # scikit-image's sample photos (installed --no-deps)
    if spec is None:
        pytest.skip("scikit-image's sample photos are not installed (scripts/setup.sh installs them)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def png_bytes(w: int, h: int, color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    PIL.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ the real checkpoint
@pytest.mark.real
@pytest.mark.parametrize("name, klass", [("chelsea.png", 285),        # Egyptian cat
                                         ("coffee.png", 967),         # espresso
                                         ("motorcycle_left.png", 665)])   # moped
def test_mobilenet_v2_reproduces_torchvision_top1(name, klass):
    base = load_base("mobilenet-v2")
    assert base.kind == "image" and base.tokenizer is None and base.processor == ImageSpec()
    with torch.no_grad():
        probs = base.model(pixels([photo(name)], base.processor)).softmax(-1)[0]
    assert int(probs.argmax()) == klass and float(probs[klass]) > 0.5


@pytest.mark.real
def test_mobilenet_v2_converts_once_and_loads_from_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path))
    first = load_base("mobilenet-v2")
    folder = tmp_path / "bases" / "mobilenet-v2"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.pth"))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "adapterkit-mobilenet-v2"
    again = load_base(str(folder))                     # the folder is a base too
    assert again.fingerprint == first.fingerprint and again.kind == "image"
    assert sum(p.numel() for p in again.model.parameters()) == 3_504_872     # torchvision's count


def test_image_folder_with_a_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import save_file

    from adapterkit.vision.mobilenet import MobileNetConfig

    model = MobileNetV2()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "classifier.1.bias"}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(MobileNetConfig().to_dict()))
    with pytest.raises(BaseNotAvailableError, match=r"missing \['classifier.1.bias'\].*load the base again"):
        load_base(str(tmp_path))


# ------------------------------------------------------------------ images in
def test_preprocess_matches_torchvision_arithmetic():
    spec = ImageSpec()
    img = PIL.new("RGB", (640, 480), (200, 30, 60))                 # resized to 341x256, cropped to 224
    x = preprocess(img, spec)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    want = (torch.tensor([200, 30, 60]) / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(x[:, 100, 100], want, atol=1e-6)
    # a gradient across x: the centre crop keeps the middle (column 112 of the crop is the image's centre)
    ramp = PIL.fromarray(np.tile((np.arange(512) // 2).astype("uint8")[None, :, None], (256, 1, 3)))
    y = preprocess(ramp, ImageSpec(mean=(0, 0, 0), std=(1, 1, 1)))
    assert abs(float(y[0, 0, 112]) - 128 / 255) < 2 / 255


def test_decode_accepts_bytes_paths_and_data_urls(tmp_path):
    raw = png_bytes(8, 6)
    (tmp_path / "a.png").write_bytes(raw)
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    for src in (raw, tmp_path / "a.png", str(tmp_path / "a.png"), url):
        img = decode(src)
        assert img.size == (8, 6) and img.mode == "RGB" and img.getpixel((0, 0)) == (200, 30, 60)


def test_decode_reads_only_the_common_formats():
    """Untrusted bytes reach PNG, JPEG, GIF, BMP and WebP decoders only (not EPS, WMF, PSD ...)."""
    buf = io.BytesIO()
    PIL.new("RGB", (4, 4)).save(buf, format="TIFF")
    with pytest.raises(ImageError, match=r"not a decodable image .*send PNG, JPEG, GIF, BMP or WebP bytes"):
        decode(buf.getvalue())


@pytest.mark.parametrize("src, message", [
    (b"not an image at all", r"image: not a decodable image \(UnidentifiedImageError.*send PNG, JPEG"),
    (png_bytes(4, 4)[:40], r"not a decodable image"),
    ("data:text/plain;base64,aGVsbG8=", r"a data URL must look like data:image/png;base64"),
    ("data:;base64,aGVsbG8=", r"the data URL has no image media type"),
    ("data:image/png;base64,@@@", r"the data URL's base64 payload is malformed"),
    ("/no/such/file.png", r"no image file at '/no/such/file.png'"),
])
def test_decode_refuses_bad_images_with_the_reason(src, message):
    with pytest.raises(ImageError, match=message):
        decode(src)


def test_decode_refuses_images_over_the_pixel_limit_before_decoding(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    decode(png_bytes(10, 10))                                         # at the limit: fine
    big, small = png_bytes(11, 10), png_bytes(10, 10)
    with monkeypatch.context() as m:                                 # the header alone refuses it
        m.setattr(PIL.Image, "load", lambda self: pytest.fail("decoded before the size check"))
        with pytest.raises(ImageError, match=r"11x10 pixels is over the 100-pixel limit; downscale it first"):
            decode(big)
    monkeypatch.setattr(images, "MAX_BYTES", 50)
    with pytest.raises(ImageError, match=r"bytes is over the 50-byte limit"):
        decode(small)
