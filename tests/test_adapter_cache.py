"""The serving adapter cache: discovery, path confinement, RAM LRU by bytes, slots with refcounts,
pins, prefetch, bad adapters, load/unload in flight, and concurrent use (right tensors, right name)."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ATTN, input_ids, tiny_llama

from adapterkit import (Adapter, AdapterNameError, AdapterNotFoundError, AdapterRuntime, BaseMismatchError,
                        ConfigError, CorruptAdapterError, LoraConfig, create_adapter)
from adapterkit.core.base import fingerprint
from adapterkit.serve import AdapterCache, AdapterPathError, NoFreeSlotError
from adapterkit.store import AdapterStore

IDS = input_ids(2, 5)
NAMES = [f"a{i}" for i in range(6)]


def make(model, name, seed, fp):
    return create_adapter(name, model, LoraConfig(r=4, alpha=8, target_modules=ATTN, init="nonzero"),
                          seed=seed, fingerprint=fp, base_name="tiny")


@pytest.fixture
def env(tmp_path):
    """A tiny Llama runtime and a root folder with six adapters a0..a5 (same size)."""
    model = tiny_llama()
    rt = AdapterRuntime(model, fingerprint=fingerprint(model), base_name="tiny", capacity=2)
    root = tmp_path / "root"
    for i, name in enumerate(NAMES):
        make(model, name, seed=i, fp=rt.fingerprint).save(root / name)
    nbytes = sum(t.numel() * t.element_size() for p in Adapter.load(root / "a0").tensors.values() for t in p.values())
    ref_model = tiny_llama()           # same weights; the reference runs each adapter alone
    ref_rt = AdapterRuntime(ref_model)
    refs: dict[str, torch.Tensor] = {}

    def reference(folder: str) -> torch.Tensor:
        if folder not in refs:
            ref_rt.add(Adapter.load(root / folder, name="ref"))
            with torch.no_grad(), ref_rt.batch(["ref"] * len(IDS)):
                refs[folder] = ref_model(input_ids=IDS).logits
            ref_rt.remove("ref")
        return refs[folder]

    return SimpleNamespace(model=model, rt=rt, root=root, tmp=tmp_path, nbytes=nbytes, reference=reference)


def cache_for(env, **kwargs) -> AdapterCache:
    kwargs.setdefault("max_loaded", 2)
    kwargs.setdefault("ram_cache_mb", 1.0)
    return AdapterCache(env.rt, adapter_dirs=[env.root], **kwargs)


def forward(env, cache, name):
    with torch.no_grad(), cache.batch([name] * len(IDS)):
        return env.model(input_ids=IDS).logits


def mb(nbytes: float) -> float:
    return nbytes / 2 ** 20


# ---------------------------------------------------------------------- discovery
def test_discovery_of_our_peft_and_store_adapters_is_lazy(env):
    peft = pytest.importorskip("peft")
    store = AdapterStore(env.tmp / "store")
    store.put(make(env.model, "stored", seed=9, fp=env.rt.fingerprint))
    store.put(make(env.model, "other-base", seed=9, fp="sha256:0000000000000000"))   # not listed
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN,
                                                           init_lora_weights=False)).eval()
    pm.save_pretrained(str(env.root / "peftie"))
    (env.root / "notes").mkdir()
    (env.root / "notes" / "README").write_text("not an adapter")
    (env.root / "file.txt").write_text("not an adapter")
    shutil.copytree(env.root / "a0", env.root / "bad name!")

    cache = AdapterCache(env.rt, store=store, adapter_dirs=[env.root])
    assert cache.names() == sorted(NAMES + ["peftie", "stored"])
    assert cache.stats()["loads"] == 0                                   # nothing read yet
    assert set(cache.roots.skipped) == {"other-base", "bad name!"}
    with pytest.raises(AdapterNotFoundError, match="'other-base' is not served: a store adapter made for another base"):
        cache.acquire("other-base")

    with cache.acquire("peftie"):
        got = forward(env, cache, "peftie")
    with torch.no_grad():
        want = pm(input_ids=IDS).logits
        with pm.disable_adapter():
            bare = pm(input_ids=IDS).logits
    assert not torch.allclose(want, bare, atol=1e-4)                     # the adapter does something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with cache.acquire("stored"):
        pass
    # A folder added after startup is found on its first request.
    shutil.copytree(env.root / "a1", env.root / "late")
    assert "late" not in cache.names()
    with cache.acquire("late"):
        torch.testing.assert_close(forward(env, cache, "late"), env.reference("a1"))
    assert "late" in cache.names()
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'; served adapters: a0, a1"):
        cache.acquire("nope")


def test_a_name_in_two_roots_is_an_error_naming_both(env):
    second = env.tmp / "second"
    shutil.copytree(env.root / "a3", second / "a3")
    with pytest.raises(AdapterNameError, match=r"'a3' is in two roots: .*root/a3 and .*second/a3"):
        AdapterCache(env.rt, adapter_dirs=[env.root, second])
    store = AdapterStore(env.tmp / "store")
    store.put(make(env.model, "a1", seed=1, fp=env.rt.fingerprint))
    with pytest.raises(AdapterNameError, match=r"'a1' is in two roots: .*store/adapters/a1@\w+ and .*root/a1"):
        AdapterCache(env.rt, store=store, adapter_dirs=[env.root])
    # The same root given twice is one root, not a clash.
    assert "a3" in AdapterCache(env.rt, adapter_dirs=[env.root, str(env.root) + "/"]).names()


# ---------------------------------------------------------------------- path confinement
def test_load_by_path_is_confined_to_the_roots(env):
    outside = env.tmp / "outside"
    make(env.model, "evil", seed=7, fp=env.rt.fingerprint).save(outside / "evil")
    os.symlink(outside / "evil", env.root / "link")                      # a folder symlinked out
    sneaky = env.root / "sneaky"                                         # a weights file symlinked out
    sneaky.mkdir()
    shutil.copy(outside / "evil" / "adapter_config.json", sneaky)
    os.symlink(outside / "evil" / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    cache = cache_for(env)
    assert "link" not in cache.names()
    assert "links outside the adapter roots" in cache.roots.skipped["link"]

    attacks = [
        (str(env.root / ".." / "outside" / "evil"), "contains '..'"),
        ("../outside/evil", "contains '..'"),
        (str(env.root / "link"), "symlink out of the adapter roots"),
        (str(outside / "evil"), "outside the adapter roots"),
        (str(outside / "does-not-exist"), "outside the adapter roots"),   # no probing outside
        ("/etc/passwd", "outside the adapter roots"),
        (str(env.root / "a0" / "adapter_model.safetensors"), "is a file, not an adapter folder"),
        (str(env.root / "nope"), "does not exist"),
        (str(sneaky), "adapter_model.safetensors in adapter folder 'sneaky' links outside"),
        (str(env.root), "outside the adapter roots"),                     # the root itself
    ]
    for path, message in attacks:
        with pytest.raises(AdapterPathError, match=message):
            cache.load("x", path)
    with pytest.raises(AdapterPathError, match="links outside"):         # discovered, refused at read
        cache.acquire("sneaky")
    assert "x" not in cache.names() and cache.stats()["loads"] == 0
    # A relative path is taken inside the roots.
    cache.load("alias", "a1")
    with cache.acquire("alias"):
        torch.testing.assert_close(forward(env, cache, "alias"), env.reference("a1"))


# ---------------------------------------------------------------------- tiers
def test_ram_tier_is_an_lru_bounded_in_bytes(env):
    nb = env.nbytes
    cache = cache_for(env, max_loaded=1, ram_cache_mb=mb(2.5 * nb))

    def ram():
        s = cache.stats()
        assert s["ram_bytes"] == nb * len(s["ram_adapters"]) <= s["ram_budget_bytes"]
        return s["ram_adapters"]

    cache.prefetch("a0").result()
    cache.prefetch("a1").result()
    assert ram() == ["a0", "a1"]
    assert cache.prefetch("a0") is None                                  # already there: touched
    assert ram() == ["a1", "a0"]
    cache.prefetch("a2").result()                                        # evicts a1, the least recent
    assert ram() == ["a0", "a2"] and cache.stats()["evictions_ram"] == 1
    with cache.acquire("a3"):                                            # disk -> slot
        pass
    assert ram() == ["a0", "a2"]
    with cache.acquire("a0"):                                            # RAM -> slot; a3 slot -> RAM
        pass
    assert ram() == ["a2", "a3"]
    with cache.acquire("a4"):                                            # a0 slot -> RAM evicts a2
        pass
    assert ram() == ["a3", "a0"]
    s = cache.stats()
    assert (s["evictions_slot"], s["evictions_ram"], s["ram_hits"], s["ram_misses"]) == (2, 2, 1, 2)
    assert s["loads"] == 5 and s["load_seconds"]["count"] == 5 and s["load_seconds"]["buckets"]["+Inf"] == 5
    # An adapter larger than the whole budget is never kept in RAM.
    small = AdapterCache(AdapterRuntime(tiny_llama()), adapter_dirs=[env.root], ram_cache_mb=mb(nb / 2))
    small.prefetch("a0").result()
    assert small.stats()["ram_adapters"] == [] and small.stats()["ram_rejects"] == 1


def test_in_flight_adapters_are_never_evicted_and_full_slots_raise(env):
    cache = cache_for(env, max_loaded=2)
    h0, h1 = cache.acquire("a0"), cache.acquire("a1")
    with pytest.raises(NoFreeSlotError, match="no free adapter slot for 'a2': all 2 slots"):
        cache.acquire("a2")
    s = cache.stats()
    assert {n: a["slot"] for n, a in s["active"].items()} == {"a0": h0.slot, "a1": h1.slot}
    assert s["busy_errors"] == 1 and s["ram_adapters"] == ["a2"]         # the read is kept
    h0.release()
    with pytest.raises(ConfigError, match="already released"):
        h0.release()
    h2 = cache.acquire("a2")                                             # evicts idle a0, never a1
    assert set(cache.stats()["active"]) == {"a1", "a2"}
    # With a timeout, acquire waits for a release instead of failing.
    timer = threading.Timer(0.2, h1.release)
    timer.start()
    t0 = time.monotonic()
    h3 = cache.acquire("a3", timeout=10)
    assert time.monotonic() - t0 >= 0.15
    assert set(cache.stats()["active"]) == {"a2", "a3"}
    torch.testing.assert_close(forward(env, cache, "a3"), env.reference("a3"))
    h2.release()
    h3.release()
    assert all(a["refs"] == 0 for a in cache.stats()["active"].values())


def test_pins_hold_their_slots(env):
    cache = cache_for(env, max_loaded=3)
    cache.pin("a0")
    cache.pin("a1")
    with pytest.raises(ConfigError, match="cannot pin 'a2': 2 of 3 adapter slots are pinned"):
        cache.pin("a2")
    for name in ("a3", "a4", "a5"):
        with cache.acquire(name):
            pass
    s = cache.stats()
    # a2 (attached by the refused pin), a3 and a4 were evicted; the pinned a0, a1 never.
    assert set(s["active"]) == {"a0", "a1", "a5"} and s["evictions_slot"] == 3 and s["pinned"] == ["a0", "a1"]
    assert cache.unpin("a0") and not cache.unpin("a0")
    with cache.acquire("a2"):                                            # a0 is now the LRU idle one
        pass
    assert set(cache.stats()["active"]) == {"a1", "a2", "a5"}


def test_prefetch_then_acquire_is_a_ram_hit_and_errors_surface_on_acquire(env):
    bad = env.root / "bad"
    shutil.copytree(env.root / "a0", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cache = cache_for(env)
    fut = cache.prefetch("a0")
    assert cache.prefetch("a0") in (fut, None)                           # idempotent
    fut.result(timeout=30)
    assert cache.prefetch("a0") is None
    h = cache.acquire("a0")
    s = cache.stats()
    assert (s["loads"], s["prefetches"], s["ram_hits"], s["ram_misses"], s["slot_misses"]) == (1, 1, 1, 0, 1)
    cache.acquire("a0").release()
    h.release()
    assert cache.stats()["slot_hits"] == 1 and cache.stats()["requests"] == {"a0": 2}

    with pytest.raises(CorruptAdapterError):
        cache.prefetch("bad").result(timeout=30)
    with pytest.raises(CorruptAdapterError, match="truncated or corrupt"):
        cache.acquire("bad")                                             # the prefetch's error
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        cache.prefetch("nope")
    cache.close()


def test_a_bad_adapter_fails_alone(env):
    bad = env.root / "bad"
    shutil.copytree(env.root / "a0", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    make(env.model, "foreign", seed=3, fp="sha256:0000000000000000").save(env.root / "foreign")
    cache = cache_for(env, max_loaded=2)
    with cache.acquire("a0"):
        pass
    h1 = cache.acquire("a1")                                             # slots full: a0 idle, a1 busy
    with pytest.raises(CorruptAdapterError, match="truncated or corrupt"):
        cache.acquire("bad")
    with pytest.raises(BaseMismatchError, match=r"made for base tiny \(sha256:0000000000000000\)"):
        cache.acquire("foreign")
    assert set(cache.stats()["active"]) == {"a0", "a1"}                 # a refused adapter evicts nobody
    with pytest.raises(CorruptAdapterError):
        cache.load("bad2", env.root / "bad")
    with pytest.raises(BaseMismatchError):
        cache.load("foreign2", env.root / "foreign")
    assert "bad2" not in cache.names() and "foreign2" not in cache.names()
    assert set(env.rt.adapters) == {"a0", "a1"}
    h1.release()
    with cache.acquire("a2"):
        torch.testing.assert_close(forward(env, cache, "a2"), env.reference("a2"))
    s = cache.stats()
    assert (s["load_errors"], s["attach_errors"]) == (2, 2)


def test_load_and_unload_while_in_flight(env):
    cache = cache_for(env)
    src = cache.load("x", env.root / "a0")
    assert "x" in cache.names() and cache.stats()["ram_adapters"] == ["x"]   # read + validated now
    assert cache.load("x", str(env.root / "a0")) == src                  # same folder again: no-op
    with pytest.raises(AdapterNameError, match="an adapter named 'x' is already served"):
        cache.load("x", env.root / "a1")
    h = cache.acquire("x")
    assert cache.unload("x") is False                                    # deferred: one request in flight
    assert "x" not in cache.names()
    with pytest.raises(AdapterNotFoundError):
        cache.acquire("x")
    torch.testing.assert_close(forward(env, cache, "x"), env.reference("a0"))   # in flight: still served
    assert cache.stats()["draining"] == ["x"]
    cache.load("x", env.root / "a1")             # the name is free at once; the old version keeps draining
    with cache.acquire("x") as h2:
        assert h2.slot != h.slot
        torch.testing.assert_close(forward(env, cache, "x"), env.reference("a1"))
        with torch.no_grad(), cache.locked(), env.rt.use(env.rt.batch_from_ids(torch.tensor([h.slot] * len(IDS)))):
            torch.testing.assert_close(env.model(input_ids=IDS).logits, env.reference("a0"))
    h.release()
    assert cache.stats()["draining"] == [] and len(env.rt.adapters) == 1   # only the new version is left
    with cache.acquire("x"):
        torch.testing.assert_close(forward(env, cache, "x"), env.reference("a1"))
    assert cache.unload("x") is True and not env.rt.adapters
    assert cache.unload("a2") is True                                    # a root's adapter: hidden
    with pytest.raises(AdapterNotFoundError):
        cache.acquire("a2")
    with pytest.raises(AdapterNotFoundError, match="nothing to unload"):
        cache.unload("a2")
    cache.load("a2", env.root / "a2")                                    # named again: served again
    assert "a2" in cache.names()
    shutil.copytree(env.root / "a3", env.root / "fresh")                # a root's name, not yet requested
    with pytest.raises(AdapterNameError, match="an adapter named 'fresh' is already served"):
        cache.load("fresh", env.root / "a4")


# ---------------------------------------------------------------------- threads
def test_concurrent_acquire_release_serves_the_right_tensors(env):
    cache = cache_for(env, max_loaded=3, ram_cache_mb=mb(2 * env.nbytes))
    want = {n: env.reference(n) for n in NAMES}
    assert not torch.allclose(want["a0"], want["a1"], atol=1e-4)        # adapters differ: not vacuous
    errors: list[str] = []
    busy: list[int] = []       # list.append is atomic across threads; += on an int is not
    done: list[int] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(10):
            name = rng.choice(NAMES)
            try:
                handle = cache.acquire(name)
            except NoFreeSlotError:
                busy.append(1)
                time.sleep(0.001)
                continue
            except Exception as exc:  # noqa: BLE001 - any other error fails the test
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            try:
                time.sleep(rng.random() * 0.002)
                got = forward(env, cache, name)
                if not torch.allclose(got, want[name], atol=1e-5):
                    errors.append(f"{name}: wrong output")
                done.append(1)
            finally:
                handle.release()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]
    s = cache.stats()
    assert all(a["refs"] == 0 for a in s["active"].values())
    assert len(s["active"]) <= 3 and set(s["active"]) == set(env.rt.adapters)
    assert s["ram_bytes"] <= s["ram_budget_bytes"]
    assert sum(s["requests"].values()) == len(done) == 80 - len(busy) and s["busy_errors"] == len(busy)
    assert s["slot_hits"] + s["slot_misses"] == 80
