"""Compositions of stored adapters, made ready to train (families: methods/scalearn.py, fusion.py):

    comp = compose("tweets-from-all", base, [store.get(n) for n in ("rt", "debates", "news")])
    comp = compose("tweets-fusion", base, sources, method="fusion")

The composition carries its sources' tensors (frozen) at the sites all of them adapt, a fresh ω, and
pins each source by content fingerprint (lineage and config): AdapterStore.get refuses it once a
source was replaced or deleted (`check_sources`); so does the server."""

from __future__ import annotations

from typing import Any, Sequence

from ..core.adapter import Adapter, create_adapter
from ..errors import BaseMismatchError, ConfigError
from ..methods import get_method
from ..methods.composed import source_config_json


def compose(name: str, base: Any, sources: Sequence[Adapter], *, method: str = "scalearn", seed: int = 0,
            task: str | None = None, **options: Any) -> Adapter:
    """A composition (`method`: scalearn or fusion) over `sources` on `base`: its own tensors from their init,
    the sources' tensors copied, frozen; `options` are the family config's (variant, init_std ...)."""
    from ..merge.common import content_fingerprint

    family = get_method(method)
    if not getattr(family, "composes", False):
        raise ConfigError(f"{method!r} is not a composition family; use scalearn or fusion")
    if not sources:
        raise ConfigError(f"a {family.title} composition needs source adapters: name at least one")
    for s in sources:
        fp = s.meta.base_fingerprint
        if fp and base.fingerprint and fp != base.fingerprint:
            raise BaseMismatchError(f"source adapter {s.name!r} was made for base {s.meta.base_name or '?'} ({fp}), "
                                    f"not {base.name} ({base.fingerprint}); compose adapters of one base")
    shared = [site for site in sources[0].tensors if all(site in s.tensors for s in sources[1:])]
    if not shared:
        raise ConfigError("the sources share no site: " + "; ".join(f"{s.name!r} ({s.summary()})" for s in sources)
                          + "; compose adapters that adapt the same modules (e.g. LoRA on the attention "
                          "projections, or bottlenecks at the same blocks)")
    prints = tuple(content_fingerprint(s) for s in sources)
    given = {k: v for k, v in options.items() if v is not None}
    config = family.config_cls(sources=tuple(s.name for s in sources),
                               source_configs=tuple(source_config_json(s.config) for s in sources),
                               target_modules=tuple(shared), fingerprints=prints, **given)
    comp = create_adapter(name, base.model, config, seed=seed, fingerprint=base.fingerprint, base_name=base.name,
                          task=task)
    if set(comp.tensors) != set(shared):
        raise ConfigError(f"the sources' shared sites {sorted(set(shared) - set(comp.tensors))[:3]} are not "
                          "modules of this base; compose adapters of this base")
    for site, parts in comp.tensors.items():
        for i, s in enumerate(sources):
            parts.update({f"s{i}_{k}": t.detach().clone() for k, t in s.tensors[site].items()})
    comp.meta.lineage = [{"op": "compose", "method": method, "options": given,
                          "sources": [{"name": s.name, "fingerprint": fp} for s, fp in zip(sources, prints)]}]
    return comp


def stale_sources(adapter: Adapter, store: Any) -> dict[str, str]:
    """{source: why} for each source of a composition the store no longer holds as it was pinned."""
    from ..route.common import AdapterRecord, stale_adapters

    config = adapter.config
    prints = getattr(config, "fingerprints", ())
    if not getattr(adapter.method, "composes", False) or not prints:
        return {}
    records = [AdapterRecord(n, fp, None, None, None) for n, fp in zip(config.sources, prints)]
    return stale_adapters(records, store, pinned="composed over")


def check_sources(adapter: Adapter, store: Any) -> None:
    """Refuse (StaleSourceError) a composition whose sources `store` no longer holds as composed."""
    stale = stale_sources(adapter, store)
    if stale:
        from ..errors import StaleSourceError

        raise StaleSourceError(f"adapter {adapter.name!r} composes {', '.join(map(repr, stale))}, which the store "
                               f"no longer holds as composed: {'; '.join(stale.values())}; compose and train it "
                               "again over the current sources")
