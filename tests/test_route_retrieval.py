"""Retrieval router on a tiny random Llama: routing, calibration, fallback, top-k, the store artifact
and its lineage, and bad input with exact messages."""

import random

import pytest
import torch
from conftest import save_tiny, save_tiny_tokenizer

from adapterkit import BaseMismatchError, ConfigError, LoraConfig, create_adapter, load_base
from adapterkit.errors import AdapterNameError
from adapterkit.route import (Decision, EmptyPromptError, Encoder, RouterNotFoundError, StaleRouterError,
                              default_router, fit_retrieval, list_routers, load_router)
from adapterkit.route.retrieval import RetrievalRouter, fit_temperature
from adapterkit.store import AdapterStore

# Three "tasks" with disjoint vocabularies of the tiny tokenizer, and words no task uses (OOD).
VOCAB = {"a": [f"w{i}" for i in range(0, 20)], "b": [f"w{i}" for i in range(20, 40)],
         "c": [f"w{i}" for i in range(40, 60)]}
OOD_WORDS = [f"w{i}" for i in range(60, 73)]


class BagOfWords:
    """A deterministic encoder (word counts over the tiny vocabulary): the router's logic is tested on
    features where tasks and OOD text are separable by construction; a random tiny transformer's
    features are too noisy for exact expectations (see the tiny-Llama test below)."""
    name, fingerprint, max_length = "bag-of-words", "sha256:bow", 128

    def embed(self, texts):
        out = torch.zeros(len(texts), 74)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, int(w[1:]) if w[1:].isdigit() and w[0] == "w" else 73] += 1
        return out

    def spec(self):
        return {"name": self.name, "fingerprint": self.fingerprint, "pooling": "mean", "max_length": 128}

    def check(self, spec):
        return Encoder.check(self, spec)


def sentences(words, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama base with a tokenizer, three stored adapters (tasks a, b, c) and their texts."""
    root = tmp_path_factory.mktemp("route")
    path = save_tiny("llama", root / "tiny-llm")
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    store = AdapterStore(root / "store")
    adapters = []
    for i, task in enumerate("abc"):
        ad = create_adapter(f"ad-{task}", base.model, LoraConfig(r=2, init="nonzero"), seed=i,
                            fingerprint=base.fingerprint, base_name=base.name, task=task)
        store.put(ad)
        adapters.append(ad)
    examples = {f"ad-{t}": sentences(VOCAB[t], 40, f"fit-{t}") for t in "abc"}
    test = {f"ad-{t}": sentences(VOCAB[t], 20, f"test-{t}") for t in "abc"}
    return base, store, adapters, examples, test


def fit(world, name="r1", **kw):
    base, store, adapters, examples, _ = world
    return fit_retrieval(name, adapters, examples, BagOfWords(), **kw)


def test_mean_pooled_states_of_a_tiny_random_llama_route_most_prompts_right(world):
    base, _, adapters, examples, test = world
    router = fit_retrieval("llama", adapters, examples, Encoder.from_base(base))
    texts = [(n, t) for n, ts in test.items() for t in ts]
    right = sum(d.top == n for (n, _), d in zip(texts, router.route([t for _, t in texts])))
    assert right / len(texts) >= 0.85


def test_routes_in_task_prompts_to_their_adapter_with_calibrated_confidence(world):
    router = fit(world)
    _, _, _, _, test = world
    for name, texts in test.items():
        for d in router.route(texts):
            assert isinstance(d, Decision)
            assert d.adapters == {name: 1.0} and not d.fallback, d
            assert d.top == name and d.confidence > 0.5
            assert d.reason.startswith(f"nearest adapter {name!r}: similarity ")
            assert set(d.scores) == {"ad-a", "ad-b", "ad-c"} and max(d.scores, key=d.scores.get) == name
    cal = router.calibration
    assert cal["accuracy"] == 1.0 and cal["coverage"] >= cal["coverage_target"] == 0.99
    assert cal["held_out"] == {"ad-a": 8, "ad-b": 8, "ad-c": 8}
    assert 0.0019 <= router.temperature <= 2.01


@pytest.mark.parametrize("neighbors, why", [
    (10, "out of distribution: the mean similarity to the 10 nearest examples is 0.000 < threshold "),
    (0, "out of distribution: the nearest adapter "),          # descriptors: the top score is the test
])
def test_out_of_distribution_prompts_go_to_the_fallback_never_to_an_adapter(world, neighbors, why):
    router = fit(world, neighbors=neighbors)
    assert router.to_meta()["ood"] == ("knn-uncentered" if neighbors else "max-score")
    ood = sentences(OOD_WORDS, 30, "ood")
    for d in router.route(ood):
        assert d.fallback and d.adapters == {}, d
        assert d.reason.startswith(why)
        assert d.reason.endswith("; served by the base model")
    # a named fallback adapter serves them instead of the base
    base, store, adapters, examples, _ = world
    router = fit_retrieval("r-fb", adapters[:2], {k: examples[k] for k in ("ad-a", "ad-b")}, BagOfWords(),
                           fallback=adapters[2])
    for d in router.route(ood[:5]):
        assert d.fallback and d.adapters == {"ad-c": 1.0}
        assert d.reason.endswith("; served by the fallback adapter 'ad-c'")


def test_top_k_puts_several_adapters_on_the_row_with_weights_from_the_scores():
    router = RetrievalRouter("t", [], torch.eye(3), torch.zeros(3), 0.5, 0.0, {}, top_k=2, min_weight=0.0)
    router.records = [_rec(n) for n in ("x", "y", "z")]
    [d] = router.decide(torch.tensor([[0.9, 0.6, 0.1]]))
    p = torch.softmax(torch.tensor([0.9, 0.6, 0.1]) / 0.5, 0)
    assert list(d.adapters) == ["x", "y"]
    assert d.adapters["x"] == pytest.approx(float(p[0] / (p[0] + p[1])), abs=1e-6)
    assert sum(d.adapters.values()) == pytest.approx(1.0, abs=1e-5)
    assert d.confidence == pytest.approx(float(p[0]))
    # min_weight drops a negligible second adapter
    router.min_weight, router.temperature = 0.05, 0.05
    [d] = router.decide(torch.tensor([[0.9, 0.6, 0.1]]))
    assert d.adapters == {"x": 1.0}


@pytest.mark.parametrize("sims, unusable, adapters, fallback, reason", [
    ([0.8, 0.1], {}, {"x": 1.0}, False, "nearest adapter 'x': similarity 0.800 >= threshold 0.300, confidence"),
    ([0.2, 0.1], {}, {}, True, "out of distribution: the nearest adapter 'x' has similarity 0.200 < threshold "
                               "0.300; served by the base model"),
    ([0.8, 0.1], {"x": "adapter 'x' was deleted from the store"}, {}, True,
     "the nearest adapter is unusable: adapter 'x' was deleted from the store; served by the base model"),
    ([0.1, 0.8], {"x": "adapter 'x' was deleted from the store"}, {"y": 1.0}, False, "nearest adapter 'y'"),
    ([0.8, 0.1], {"x": "gone x", "y": "gone y"}, {}, True,
     "no adapter of this router is usable: gone x; gone y; served by the base model"),
])
def test_decide_is_a_pure_function_of_the_similarities(sims, unusable, adapters, fallback, reason):
    router = RetrievalRouter("t", [_rec("x"), _rec("y")], torch.eye(2), torch.zeros(2), 0.1, 0.3, {})
    router.unusable = dict(unusable)
    [d] = router.decide(torch.tensor([sims]))
    assert d.adapters == adapters and d.fallback is fallback
    assert d.reason.startswith(reason)


def test_temperature_fit_prefers_sharp_scores_when_they_are_right_and_soft_when_wrong():
    labels = torch.tensor([0, 1] * 50)
    sims = torch.nn.functional.one_hot(labels, 2).float() * 0.2
    assert fit_temperature(sims, labels) <= 0.003                   # always right: as sharp as allowed
    noisy = sims.clone()
    noisy[::4] = noisy[::4].flip(1)                                   # a quarter wrong
    t = fit_temperature(noisy, labels)
    p = torch.softmax(noisy / t, 1).max(1).values.mean()
    assert 0.65 < float(p) < 0.85                                     # confidence ≈ 75 % accuracy


def test_saved_router_has_its_lineage_and_routes_the_same_after_loading(world):
    base, store, adapters, _, test = world
    router = fit(world, "saved")
    path = router.save(store)
    assert (path / "router.json").is_file() and (path / "router.safetensors").is_file()
    assert list_routers(store) == ["saved"] and default_router(store) == "saved"
    loaded = load_router(store, "auto", encoder=BagOfWords())
    assert isinstance(loaded, RetrievalRouter) and loaded.name == "saved"
    texts = [t for ts in test.values() for t in ts[:3]]
    assert loaded.route(texts) == router.route(texts)
    meta = loaded.to_meta()
    assert meta["type"] == "adapterkit.router.retrieval" and meta["format_version"] == 1
    from adapterkit.merge.common import content_fingerprint
    assert [r["fingerprint"] for r in meta["adapters"]] == [content_fingerprint(a) for a in adapters]
    assert {r["base_fingerprint"] for r in meta["adapters"]} == {base.fingerprint}
    assert meta["encoder"] == {"name": "bag-of-words", "fingerprint": "sha256:bow", "pooling": "mean",
                               "max_length": 128}
    assert meta["examples"]["fit"]["ad-a"]["count"] == 32 and meta["examples"]["source"] == "examples"
    with pytest.raises(AdapterNameError, match="a router named 'saved' is already in the store"):
        router.save(store)
    router.save(store, overwrite=True)


def test_a_deleted_or_replaced_adapter_is_refused_naming_it(world, tmp_path):
    base, _, adapters, examples, test = world
    store = AdapterStore(tmp_path / "store")
    for a in adapters:
        store.put(a)
    fit(world, "stale").save(store)
    store.remove("ad-b")
    other = create_adapter("ad-c", base.model, LoraConfig(r=2, init="nonzero"), seed=9,
                           fingerprint=base.fingerprint, base_name=base.name)
    store.put(other, overwrite=True)
    from adapterkit.merge.common import content_fingerprint
    old_c, new_c = content_fingerprint(adapters[2]), content_fingerprint(other)
    with pytest.raises(StaleRouterError) as info:
        load_router(store, "stale", encoder=BagOfWords())
    assert str(info.value) == (
        "router 'stale' refuses to route to 'ad-b', 'ad-c': adapter 'ad-b' was deleted from the store; "
        f"adapter 'ad-c' was replaced in the store (content {new_c}, the router was fitted on {old_c}); "
        "fit the router again (adapterkit route fit ... --overwrite)")
    router = load_router(store, "stale", encoder=BagOfWords(), strict=False)
    assert router.route(test["ad-a"][:3])[0].adapters == {"ad-a": 1.0}
    for d in router.route(test["ad-b"][:3]):
        assert d.fallback and d.adapters == {}
        assert d.reason == ("the nearest adapter is unusable: adapter 'ad-b' was deleted from the store; "
                            "served by the base model")


def test_adapters_of_different_bases_are_refused_naming_both_fingerprints(world):
    base, _, adapters, examples, _ = world
    foreign = create_adapter("foreign", base.model, LoraConfig(r=2), fingerprint="sha256:other-base",
                             base_name="other")
    with pytest.raises(BaseMismatchError) as info:
        fit_retrieval("x", [adapters[0], foreign], {"ad-a": examples["ad-a"], "foreign": examples["ad-b"]},
                      Encoder.from_base(base))
    assert str(info.value) == (
        f"cannot route between adapters of different bases: 'ad-a' was made for {base.name} ({base.fingerprint}) "
        "but 'foreign' for other (sha256:other-base); a router serves the adapters of one base")
    router = fit(world)
    with pytest.raises(BaseMismatchError, match=r"adapter 'ad-a' was made for base .* but the router runs on "
                                                r"other \(sha256:zzz\); pass the adapters' base with --base"):
        router.check_base("sha256:zzz", "other")


def test_another_encoder_is_refused(world, tmp_path):
    base, store, adapters, examples, _ = world
    fit_retrieval("enc", adapters, examples, Encoder.from_base(base)).save(store, overwrite=True)
    path = save_tiny("llama", tmp_path / "other", seed=5)
    save_tiny_tokenizer(path)
    other = load_base(str(path))
    with pytest.raises(BaseMismatchError) as info:
        load_router(store, "enc", encoder=Encoder.from_base(other))
    assert str(info.value) == (
        f"the router was fitted with encoder {base.name} ({base.fingerprint}), but the encoder given is "
        f"{other.name} ({other.fingerprint}); load the router with its own encoder")


@pytest.mark.parametrize("texts, bad", [([""], [0]), (["w1 w2", "   \n\t"], [1]), (["w1", None, ""], [1, 2])])
def test_empty_or_whitespace_prompts_are_refused(world, texts, bad):
    router = fit(world)
    with pytest.raises(EmptyPromptError) as info:
        router.route(texts)
    assert str(info.value) == (f"prompt(s) at index {bad} are empty or whitespace only; a router chooses the "
                               "adapter from the prompt's text: send text, or name an adapter as the model")


def test_bad_fit_input_is_refused(world):
    base, store, adapters, examples, _ = world
    enc = Encoder.from_base(base)
    cases = [
        (lambda: fit_retrieval("x", [], {}, enc), "a router needs at least one adapter; --adapters is empty"),
        (lambda: fit_retrieval("x", [adapters[0], adapters[0]], examples, enc),
         "adapter(s) ['ad-a'] are listed more than once; list each adapter once"),
        (lambda: fit_retrieval("x", adapters, {"ad-a": examples["ad-a"]}, enc),
         "no example texts for adapter(s) ['ad-b', 'ad-c'] (a retrieval router needs >= 2 per adapter); give the "
         "adapters a task in the store or pass --examples FILE"),
        (lambda: fit_retrieval("x", adapters[:1], {"ad-a": examples["ad-a"], "zz": ["w1 w2"]}, enc),
         "examples name adapter(s) ['zz'] that are not in the router's adapters ['ad-a']"),
        (lambda: fit_retrieval("x", adapters, examples, enc, coverage=0.0),
         "coverage must be in (0, 1] (the share of in-task prompts that must pass), got 0.0"),
        (lambda: fit_retrieval("x", adapters, examples, enc, top_k=0), "top_k must be a positive integer, got 0"),
    ]
    for call, message in cases:
        with pytest.raises(Exception) as info:
            call()
        assert str(info.value) == message
    router = fit(world, "ad-a")
    with pytest.raises(AdapterNameError, match="'ad-a' is an adapter in the store at .*; routers and adapters share"):
        router.save(store)
    router.name = "auto"
    with pytest.raises(AdapterNameError, match="'auto' means the store's default router; give the router another"):
        router.save(store)
    with pytest.raises(RouterNotFoundError, match="no router named 'nope' in the store at"):
        load_router(store, "nope")


def _rec(name):
    from adapterkit.route import AdapterRecord
    return AdapterRecord(name, "sha256:x", None, None, None)


def test_neighbor_scores_equal_a_direct_reference_and_survive_the_store(world):
    """neighbors=k: score_a = mean cosine to a's k nearest (centered) examples; 0: the descriptors."""
    base, store, adapters, examples, test = world
    enc = BagOfWords()
    router = fit(world, "knn", neighbors=3, held_out=test, lexical=False)   # fit texts are exactly `examples`
    texts = [t for ts in test.values() for t in ts[:4]]
    emb = enc.embed(texts)
    center = torch.stack([enc.embed(examples[n]).mean(0) for n in router.names]).mean(0)
    z = torch.nn.functional.normalize(emb - center, dim=-1)
    want = torch.stack([
        (z @ torch.nn.functional.normalize(enc.embed(examples[n]) - center, dim=-1).t()).topk(3, dim=1).values.mean(1)
        for n in router.names], 1)
    torch.testing.assert_close(router.similarities(emb), want)
    # OOD typicality: mean cosine of the UNcentered embedding to its 3 nearest fit examples of any adapter
    raw = torch.nn.functional.normalize(torch.cat([enc.embed(examples[n]) for n in router.names]), dim=-1)
    want_t = (torch.nn.functional.normalize(emb, dim=-1) @ raw.t()).topk(3, dim=1).values.mean(1)
    torch.testing.assert_close(router.typicality(emb), want_t)
    flat = fit(world, "flat", neighbors=0, held_out=test, lexical=False)
    assert flat.bank is None and not torch.allclose(flat.similarities(emb), want)
    router.save(store, overwrite=True)
    again = load_router(store, "knn", encoder=enc)
    assert again.neighbors == 3
    torch.testing.assert_close(again.typicality(emb), want_t)
    assert [d.adapters for d in again.route(texts)] == [d.adapters for d in router.route(texts)]
    with pytest.raises(ConfigError) as e:
        fit(world, "bad", neighbors=-1)
    assert str(e.value) == "neighbors must be an integer >= 0 (0: one descriptor per adapter), got -1"
