"""The float64 oracle every family is held to: each row alone through a float64 copy of the bare
model, with one hook per (adapter, site) calling the family's own `reference` forward."""

import copy

import torch

from adapterkit.core.targets import site_info
from adapterkit.methods import ATTACH_INPUT


def reference(model, rows, ids, output=lambda o: o.logits):
    """Each row alone through a float64 copy of the bare model, with one hook per (adapter, site)
    calling its family's float64 `reference`, registered in stage order at each site. A row lists
    adapters or (adapter, weight) pairs: a weighted adapter adds w times its change, v + w·(f(v) - v)."""
    model64 = copy.deepcopy(model).double()
    modules = dict(model64.named_modules())
    outs = []
    for i, adapters in enumerate(rows):
        handles = []
        pairs = [a if isinstance(a, tuple) else (a, 1.0) for a in adapters]
        for a, w in sorted(pairs, key=lambda p: p[0].method.stage):
            m = a.method
            for site, tensors in a.tensors.items():
                attach = m.attach_at(a.config, site)
                info = site_info(site, modules[site], attach)
                if attach == ATTACH_INPUT:
                    hook = (lambda m_, cfg, info_, t, w_: lambda mod, args: (
                        args[0] + w_ * (m_.reference(cfg, info_, t, args[0], None) - args[0]),))(
                        m, a.config, info, tensors, w)
                    handles.append(modules[site].register_forward_pre_hook(hook))
                else:
                    hook = (lambda m_, cfg, info_, t, w_: lambda mod, args, out: out + w_ * (
                        m_.reference(cfg, info_, t, args[info_.input_arg], out) - out))(m, a.config, info, tensors, w)
                    handles.append(modules[site].register_forward_hook(hook))
        with torch.no_grad():
            outs.append(output(model64(ids[i:i + 1]))[0])
        for h in handles:
            h.remove()
    return torch.stack(outs)
