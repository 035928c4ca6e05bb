"""MobileNetV2 in plain torch, with torchvision's module names, so torchvision's ImageNet state dict
loads strictly (torchvision itself does not run with this CPU torch build).

The shipped weights (`mobilenet_v2-b0353104.pth`, torchvision's IMAGENET1K_V1) are a pickle; they are
read once with torch.load(weights_only=True) (tensors only, no code) and converted to a safetensors
folder with a config.json (core/base.py does that), so a load reads safetensors only, as every base does.

    features.0        Conv2dNormActivation(3, 32, stride 2)
    features.1..17    InvertedResidual blocks (t, c, n, s) as in the paper's table 2
    features.18       Conv2dNormActivation(320, 1280, kernel 1)
    classifier        Dropout(0.2), Linear(1280, num_classes)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

MODEL_TYPE = "adapterkit-mobilenet-v2"
# (expansion t, output channels c, repeats n, first stride s)
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
# Default sites (full-name regexes). The 1x1 (pointwise) convolutions, groups 1: every block's expansion
# (conv.0.0, absent in block 1) and projection (conv.2; block 1's conv.1), and the last 1x1 (features.18.0);
# the depthwise 3x3s are left out (LoRA on a grouped conv needs r a multiple of its channels).
POINTWISE = r"features\.(?:1\.conv\.1|(?:[2-9]|1[0-7])\.conv\.(?:0\.0|2)|18\.0)"
PROJECTIONS = r"features\.(?:1\.conv\.1|(?:[2-9]|1[0-7])\.conv\.2)"        # IA3 scales their inputs
BLOCKS = r"features\.(?:[1-9]|1[0-7])"                                      # the inverted-residual blocks
RESIDUAL_BLOCKS = r"features\.(?:3|5|6|8|9|10|12|13|15|16)"                 # blocks that keep their shape
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageSpec:
    """How the base wants its pixels (torchvision's IMAGENET1K_V1 transforms for MobileNetV2)."""

    resize: int = 256                       # shorter side, bilinear with antialias
    crop: int = 224                         # centre crop
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageSpec":
        return cls(int(d["resize"]), int(d["crop"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))


@dataclass(frozen=True)
class MobileNetConfig:
    num_classes: int = 1000
    dropout: float = 0.2
    image: ImageSpec = field(default_factory=ImageSpec)
    model_type: str = MODEL_TYPE
    architectures: tuple[str, ...] = ("MobileNetV2",)
    hidden_size: int = 1280                 # the pooled feature width (what a classification head reads)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["architectures"] = list(self.architectures)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MobileNetConfig":
        if d.get("model_type") != MODEL_TYPE:
            raise ValueError(f"not a MobileNetV2 config (model_type {d.get('model_type')!r})")
        return cls(num_classes=int(d.get("num_classes", 1000)), dropout=float(d.get("dropout", 0.2)),
                   image=ImageSpec.from_dict(d["image"]) if "image" in d else ImageSpec())


def conv_norm_act(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, ReLU6; 'same' padding."""
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1), 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(inp * expand)
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = [conv_norm_act(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [conv_norm_act(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """x: [n, 3, H, W] normalised pixels -> logits [n, num_classes]; features(x) -> pooled [n, 1280]."""

    def __init__(self, config: MobileNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or MobileNetConfig()
        layers: list[nn.Module] = [conv_norm_act(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(conv_norm_act(inp, self.config.hidden_size, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(self.config.dropout),
                                        nn.Linear(self.config.hidden_size, self.config.num_classes))

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """The global-average-pooled features the classifier reads: [n, 1280]."""
        return nn.functional.adaptive_avg_pool2d(self.features(pixels), 1).flatten(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(pixels))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
