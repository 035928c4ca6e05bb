"""The float64 oracle every family is held to: each row alone through a float64 copy of the bare
model, with one hook per (adapter, site) calling the family's own `reference` forward."""

import copy

import torch

from adapterkit.core.targets import site_info
from adapterkit.methods import ATTACH_INPUT


def reference(model, rows, ids, output=lambda o: o.logits):
    """Each row alone through a float64 copy of the bare model, with one hook per (adapter, site)
    calling its family's float64 `reference`, registered in stage order at each site."""
    model64 = copy.deepcopy(model).double()
    modules = dict(model64.named_modules())
    outs = []
    for i, adapters in enumerate(rows):
        handles = []
        for a in sorted(adapters, key=lambda a: a.method.stage):
            m = a.method
            for site, tensors in a.tensors.items():
                attach = m.attach_at(a.config, site)
                info = site_info(site, modules[site], attach)
                if attach == ATTACH_INPUT:
                    hook = (lambda m_, cfg, info_, t: lambda mod, args: (m_.reference(cfg, info_, t, args[0], None),))(
                        m, a.config, info, tensors)
                    handles.append(modules[site].register_forward_pre_hook(hook))
                else:
                    hook = (lambda m_, cfg, info_, t: lambda mod, args, out: m_.reference(cfg, info_, t, args[0], out))(
                        m, a.config, info, tensors)
                    handles.append(modules[site].register_forward_hook(hook))
        with torch.no_grad():
            outs.append(output(model64(ids[i:i + 1]))[0])
        for h in handles:
            h.remove()
    return torch.stack(outs)
