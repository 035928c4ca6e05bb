"""Compositions of stored adapters, made ready to train (methods/scalearn.py is the family):

    comp = compose_scalearn("tweets-from-all", base, [store.get(n) for n in ("rt", "debates", "news")])

The composition carries its sources' tensors (frozen) at the sites all of them adapt, a fresh ω, and
pins each source by content fingerprint (lineage and config): AdapterStore.get refuses it once a
source was replaced or deleted (`check_sources`); so does the server."""

from __future__ import annotations

from typing import Any, Sequence

from ..core.adapter import Adapter, create_adapter
from ..errors import BaseMismatchError, ConfigError
from ..methods.scalearn import ScaLearnConfig, source_config_json


def compose_scalearn(name: str, base: Any, sources: Sequence[Adapter], *, variant: str = "vector", seed: int = 0,
                     init_scale: float = 2.0, init_std: float = 0.001, dropout: float = 0.0,
                     task: str | None = None) -> Adapter:
    """A ScaLearn adapter over `sources` on `base` (ω from its init; the sources' tensors copied, frozen)."""
    from ..merge.common import content_fingerprint

    if not sources:
        raise ConfigError("a ScaLearn composition needs source adapters: name at least one")
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
    config = ScaLearnConfig(sources=tuple(s.name for s in sources),
                            source_configs=tuple(source_config_json(s.config) for s in sources),
                            target_modules=tuple(shared), fingerprints=prints, variant=variant,
                            init_scale=init_scale, init_std=init_std, dropout=dropout)
    comp = create_adapter(name, base.model, config, seed=seed, fingerprint=base.fingerprint, base_name=base.name,
                          task=task)
    if set(comp.tensors) != set(shared):
        raise ConfigError(f"the sources' shared sites {sorted(set(shared) - set(comp.tensors))[:3]} are not "
                          "modules of this base; compose adapters of this base")
    for site, parts in comp.tensors.items():
        for i, s in enumerate(sources):
            parts.update({f"s{i}_{k}": t.detach().clone() for k, t in s.tensors[site].items()})
    comp.meta.lineage = [{"op": "scalearn", "variant": variant,
                          "sources": [{"name": s.name, "fingerprint": fp} for s, fp in zip(sources, prints)]}]
    return comp


def stale_sources(adapter: Adapter, store: Any) -> dict[str, str]:
    """{source: why} for each source of a composition the store no longer holds as it was pinned."""
    from ..route.common import AdapterRecord, stale_adapters

    config = adapter.config
    prints = getattr(config, "fingerprints", ())
    if config.type != "scalearn" or not prints:
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
