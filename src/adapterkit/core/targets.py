"""Target modules: which modules of a base an adapter config names (PEFT's matching rules), and what
a family needs to know about each (SiteInfo)."""

from __future__ import annotations

import re

from torch import nn

from ..errors import TargetError, UnsupportedError
from ..methods.base import ATTACH_MODULE, ATTACH_OUTPUT, SiteInfo


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    return Conv1D


def site_info(name: str, module: nn.Module, attach: str = ATTACH_OUTPUT) -> SiteInfo:
    """Dimensions of a Linear, GPT-2 Conv1D or Conv2d module; for a module method (attach "module") of any
    block, from its first and last linear layers (a block maps hidden states to hidden states)."""
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return SiteInfo(name, module.in_features, module.out_features, False, module.weight.dtype,
                        module.weight.device)
    if conv1d is not None and isinstance(module, conv1d):
        n_in, n_out = module.weight.shape
        return SiteInfo(name, n_in, n_out, True, module.weight.dtype, module.weight.device)
    if isinstance(module, nn.Conv2d):
        return _conv_info(name, module)
    if attach == ATTACH_MODULE:
        if _post_ln_output_block(module):
            # BERT's feed-forward output (dense, dropout, LayerNorm(. + residual)), called with (intermediate,
            # attention output): the feed-forward block's input is the attention output, argument 1
            d = module.dense.out_features
            return SiteInfo(name, d, d, False, module.dense.weight.dtype, module.dense.weight.device, kind="module",
                            input_arg=1)
        linears = [site_info(f"{name}.{n}", m) for n, m in module.named_modules()
                   if isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))]
        if linears:
            return SiteInfo(name, linears[0].in_features, linears[-1].out_features, False, linears[0].dtype,
                            linears[0].device, kind="module")
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        if convs:                                  # a conv block: [n, C_in, H, W] -> [n, C_out, H / s, W / s]
            sh = sw = 1
            for c in convs:
                sh, sw = sh * c.stride[0], sw * c.stride[1]
            return SiteInfo(name, convs[0].in_channels, convs[-1].out_channels, False, convs[0].weight.dtype,
                            convs[0].weight.device, kind="conv-module", conv=((1, 1), (sh, sw), (0, 0)))
        raise UnsupportedError(f"target module {name!r} is a {type(module).__name__} with no linear or convolution "
                               "layer: an adapter around a block needs a block of them (an attention, MLP or "
                               "conv block)")
    raise UnsupportedError(
        f"target module {name!r} is a {type(module).__name__}; adapters wrap nn.Linear, transformers' Conv1D "
        "and nn.Conv2d only: choose target_modules that name linear or convolution layers"
    )


def _conv_info(name: str, conv: nn.Conv2d) -> SiteInfo:
    """A Conv2d site. As PEFT defines LoRA on it (lora_A a conv of the same kernel, stride and padding;
    lora_B a 1x1 conv), which needs groups 1 (PEFT refuses to merge grouped ones; a depthwise conv would
    need r a multiple of its channels), dilation 1 and zero padding."""
    why = ("groups > 1 (a depthwise or grouped conv): adapt the 1x1 (pointwise) convolutions around it"
           if conv.groups != 1 else "dilation != 1" if tuple(conv.dilation) != (1, 1) else
           f"padding_mode {conv.padding_mode!r}" if conv.padding_mode != "zeros" else
           "padding 'same' / 'valid' given as a string" if isinstance(conv.padding, str) else None)
    if why:
        raise UnsupportedError(f"target module {name!r} is a Conv2d with {why}; adapters take convolutions with "
                               "groups 1, dilation 1 and numeric zero padding")
    geometry = (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding))
    return SiteInfo(name, conv.in_channels, conv.out_channels, False, conv.weight.dtype, conv.weight.device,
                    kind="conv", conv=geometry)


def _post_ln_output_block(module: nn.Module) -> bool:
    """A BERT-style output block: a `dense` Linear into d and a `LayerNorm`, whose forward takes the
    residual as its second argument (BertOutput, RobertaOutput and their kin)."""
    import inspect

    dense, norm = getattr(module, "dense", None), getattr(module, "LayerNorm", None)
    if not isinstance(dense, nn.Linear) or not isinstance(norm, nn.LayerNorm):
        return False
    params = list(inspect.signature(module.forward).parameters)
    return len(params) >= 2 and params[1] == "input_tensor"


def name_matches(name: str, patterns: str | tuple[str, ...] | list[str] | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def match_targets(
    model: nn.Module,
    target_modules: str | tuple[str, ...] | list[str],
    exclude_modules: str | tuple[str, ...] | list[str] | None = None,
) -> list[str]:
    """Module names a config targets (PEFT's rules: a list matches a name or a dotted suffix, a
    string is a full regex, "all-linear" is every linear layer but the output head)."""
    conv1d = _conv1d_type()
    linear_types = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    names: list[str] = []
    if target_modules == "all-linear":
        head = _output_head_name(model)
        for name, module in model.named_modules():
            if isinstance(module, linear_types) and name != head and not name_matches(name, exclude_modules):
                names.append(name)
    else:
        for name, _ in model.named_modules():
            if name and name_matches(name, target_modules) and not name_matches(name, exclude_modules):
                names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear_types)})
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise TargetError(
            f"target_modules {shown!r} match no module of the base model; "
            f"its linear layers are named: {', '.join(leaves)}"
        )
    return names


def _output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None
