"""A running server never serves a stale adapter: the cache keys adapters by name and on-disk version,
so after `store.put(..., overwrite=True)` (what train/merge --overwrite do), a folder swapped in an
adapter root, or a load-by-path folder rewritten, the next request gets the new weights, while a
request already in flight finishes on the version it started with. A deleted adapter is a 404."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from conftest import ATTN, save_tiny, save_tiny_tokenizer

from adapterkit import AdapterNotFoundError, LoraConfig, create_adapter, load_base
from adapterkit.serve.engine import Engine, EngineConfig
from adapterkit.serve.requests import GenerationRequest, SamplingParams
from adapterkit.store import AdapterStore

PROMPT = [1, 5, 9, 13, 17, 21]
SHORT = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versions")
    base_dir = save_tiny("llama", tmp / "base")
    save_tiny_tokenizer(base_dir)
    base = load_base(str(base_dir))

    def lora(name, seed):
        return create_adapter(name, base.model, LoraConfig(r=4, alpha=8, target_modules=ATTN, init="nonzero",
                                                           init_std=0.5), seed=seed, fingerprint=base.fingerprint)
    return SimpleNamespace(tmp=tmp, base_dir=base_dir, lora=lora)


def engine_over(env, store=None, dirs=()):
    return Engine.build(str(env.base_dir), store=store, adapter_dirs=dirs, config=EngineConfig(max_batch=8),
                        max_loaded_adapters=2).start()


def tokens(engine, name, params=SHORT) -> tuple[int, ...]:
    s = engine.submit(GenerationRequest(prompt_ids=PROMPT, adapter=name, params=params))
    final = s.result(timeout=60)
    assert final.finish_reason == "length", final.error
    return tuple(s.token_ids)


def alone(env, adapter, params=SHORT) -> tuple[int, ...]:
    """What a fresh engine over only this adapter generates."""
    folder = env.tmp / f"alone-{adapter.name}-{id(adapter)}"
    adapter.save(folder / adapter.name)
    engine = engine_over(env, dirs=[folder])
    try:
        return tokens(engine, adapter.name, params)
    finally:
        engine.stop(drain=False)


def test_store_overwrite_while_serving(env, tmp_path):
    store = AdapterStore(tmp_path / "store")
    v1, v2 = env.lora("k2", 1), env.lora("k2", 2)
    want1, want2, want1_long = alone(env, v1), alone(env, v2), alone(env, v1, LONG)
    assert want1 != want2                                        # the versions really differ
    store.put(v1)
    engine = engine_over(env, store=store)
    try:
        assert tokens(engine, "k2") == want1
        flight = engine.submit(GenerationRequest(prompt_ids=PROMPT, adapter="k2", params=LONG))
        deadline = time.monotonic() + 30
        while not flight.token_ids:                              # it is running on version 1
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with engine.cache.locked():                              # no step runs meanwhile: still in flight
            assert flight.final is None
            store.put(v2, overwrite=True)                        # train/merge --name k2 --overwrite
        assert tokens(engine, "k2") == want2                     # the next request: version 2
        assert flight.result(timeout=60).finish_reason == "length"
        assert tuple(flight.token_ids) == want1_long             # in flight: finished on version 1
        stats = engine.cache.stats()
        assert stats["replaced"] == 1 and stats["draining"] == [] and len(engine.runtime.adapters) == 1
        assert tokens(engine, "k2") == want2                     # and it stays version 2 (no churn)
        assert engine.cache.stats()["loads"] == 2
        store.remove("k2")
        with pytest.raises(AdapterNotFoundError, match="'k2' is no longer on disk"):
            engine.submit(GenerationRequest(prompt_ids=PROMPT, adapter="k2", params=SHORT))
    finally:
        engine.stop(drain=False)


def test_a_promotion_is_served_at_the_next_request_and_in_flight_finishes_on_its_version(env, tmp_path):
    """Store versions: putting k3 again stores k3@v2 unserved; `promote` switches the name in one commit and
    the next request gets v2 (no restart); a request in flight finishes on v1; rollback serves v1 again."""
    store = AdapterStore(tmp_path / "store")
    v1, v2 = env.lora("k3", 6), env.lora("k3", 7)
    want1, want2, want1_long = alone(env, v1), alone(env, v2), alone(env, v1, LONG)
    assert want1 != want2
    store.put(v1)
    engine = engine_over(env, store=store)
    try:
        assert tokens(engine, "k3") == want1
        assert store.put_version(v2).ref == "k3@v2"
        assert tokens(engine, "k3") == want1                     # stored, not promoted: still v1
        flight = engine.submit(GenerationRequest(prompt_ids=PROMPT, adapter="k3", params=LONG))
        deadline = time.monotonic() + 30
        while not flight.token_ids:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with engine.cache.locked():
            assert flight.final is None
            store.promote("k3@v2")
        assert tokens(engine, "k3") == want2                     # the next request: the promoted version
        assert flight.result(timeout=60).finish_reason == "length"
        assert tuple(flight.token_ids) == want1_long             # in flight: finished on version 1
        store.rollback("k3")
        assert tokens(engine, "k3") == want1
    finally:
        engine.stop(drain=False)


def test_root_folder_swapped_and_load_by_path_rewritten(env, tmp_path):
    root = tmp_path / "root"
    v1, v2, v3 = env.lora("d", 3), env.lora("d", 4), env.lora("d", 5)
    want = [alone(env, v) for v in (v1, v2, v3)]
    v1.save(root / "d")
    v1.save(root / "extra" / "p")
    engine = engine_over(env, dirs=[root])
    try:
        assert tokens(engine, "d") == want[0]
        engine.cache.load("p", "extra/p")
        assert tokens(engine, "p") == want[0]
        v2.save(root / "d")                                      # an atomic whole-folder swap
        v3.save(root / "extra" / "p")
        assert tokens(engine, "d") == want[1]
        assert tokens(engine, "p") == want[2]
        assert engine.cache.stats()["replaced"] == 2
    finally:
        engine.stop(drain=False)


def test_an_unchanged_store_costs_no_catalog_lookup(env, tmp_path, monkeypatch):
    """The per-request version check reads the catalog's change mark; the row is looked up again
    only after a commit."""
    store = AdapterStore(tmp_path / "store")
    store.put(env.lora("k", 6))
    engine = engine_over(env, store=store)
    try:
        tokens(engine, "k")
        looked = []
        real = AdapterStore.row
        monkeypatch.setattr(AdapterStore, "row", lambda self, name: looked.append(name) or real(self, name))
        for _ in range(3):
            tokens(engine, "k")
        assert looked == []
        store.put(env.lora("other", 7))                          # any commit moves the mark
        tokens(engine, "k")
        assert looked == ["k"]
    finally:
        engine.stop(drain=False)
