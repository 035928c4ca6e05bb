"""The learned linear router: logistic regression at its optimum, scores equal to a dense reference,
the lexical channel separating what the embedding cannot, OOD fallback, top-k, the store artifact,
stale adapters and bad input with exact messages."""

import pytest
import torch
from test_route_retrieval import OOD_WORDS, VOCAB, BagOfWords, sentences, world  # noqa: F401 (fixture)

from adapterkit import ConfigError, LoraConfig, create_adapter
from adapterkit.route import LINEAR_TYPE, LinearRouter, StaleRouterError, fit_linear, load_router
from adapterkit.route.lexical import BUCKETS
from adapterkit.route.linear import fit_logistic, seen_rows


def fit(world, name="lin", **kw):
    _, _, adapters, examples, _ = world
    return fit_linear(name, adapters, examples, BagOfWords(), **kw)


def test_routes_in_task_prompts_with_calibrated_confidence(world):
    _, _, _, _, test = world
    router = fit(world)
    texts = [(n, t) for n, ts in test.items() for t in ts]
    decisions = router.route([t for _, t in texts])
    assert all(d.top == n and not d.fallback for (n, _), d in zip(texts, decisions))
    assert all(d.confidence > 0.9 for d in decisions)
    assert decisions[0].reason.startswith(f"nearest adapter {decisions[0].top!r}: score ")
    cal = router.calibration
    assert cal["accuracy"] == 1.0 and cal["l2"] in (1e-4, 1e-3, 1e-2) and set(cal["l2_accuracy"]) == {"0.0001",
                                                                                                       "0.001", "0.01"}


def test_the_fit_is_the_regularised_optimum():
    """The gradient of the penalised loss vanishes at the returned weights (dense and sparse features)."""
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(60, 8), dim=-1)
    x = torch.rand(60, 30).mul(torch.rand(60, 30) < 0.2).to_sparse()
    y = torch.randint(0, 3, (60,))
    wd, wl, b = fit_logistic(z, x, y, 3, 1e-2)
    params = [p.clone().requires_grad_(True) for p in (wd, wl, b)]
    logits = z @ params[0].t() + x.to_dense() @ params[1].t() + params[2]
    loss = torch.nn.functional.cross_entropy(logits, y) + 0.5e-2 * ((params[0] ** 2).sum() + (params[1] ** 2).sum())
    grads = torch.autograd.grad(loss, params)
    assert max(float(g.abs().max()) for g in grads) < 1e-4
    assert float(torch.nn.functional.cross_entropy(logits.detach(), y)) < 1.0986    # better than uniform over 3


def test_scores_equal_a_dense_reference_over_all_buckets(world):
    """W_d z + W_l x + b with the sparse seen-bucket rows == the same with dense [N, 2^20] TF-IDF rows."""
    _, _, _, _, test = world
    router = fit(world)
    texts = [t for ts in test.values() for t in ts] + ["w1 zzz never seen n-grams", "w70 w71"]
    emb = BagOfWords().embed(texts)
    got = router.similarities(emb, texts)
    full = torch.zeros(len(router.names), BUCKETS)
    full[:, router.lexical.idf_buckets] = router.weight_lexical
    z = torch.nn.functional.normalize(emb - router.center, dim=-1)
    want = z @ router.weight_dense.t() + router.bias + router.lexical.vectors(texts).to_dense() @ full.t()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert seen_rows(router.lexical, ["w1"]).shape == (1, router.lexical.idf_buckets.numel())


def test_the_lexical_channel_separates_tasks_the_embedding_cannot(world):
    """Two tasks whose words the encoder maps to one and the same feature (all out of its vocabulary):
    only the character n-grams tell them apart."""
    base, _, adapters, _, _ = world
    words = {"ad-a": ["alpha", "apple", "arrow"], "ad-b": ["zebra", "zoom", "zinc"]}
    examples = {n: sentences(w, 30, f"x{n}") for n, w in words.items()}
    test = [(n, t) for n, w in words.items() for t in sentences(w, 10, f"y{n}")]
    two = adapters[:2]
    with_lex = fit_linear("lx", two, examples, BagOfWords())
    without = fit_linear("nolx", two, examples, BagOfWords(), lexical=False)
    right = [sum(d.top == n for (n, _), d in zip(test, r.route([t for _, t in test]))) / len(test)
             for r in (with_lex, without)]
    assert right[0] == 1.0 and right[1] <= 0.6


def test_out_of_distribution_prompts_go_to_the_fallback(world):
    _, _, adapters, _, _ = world
    router = fit(world, fallback=adapters[2])
    decisions = router.route(sentences(OOD_WORDS, 10, "ood"))
    assert all(d.fallback and d.adapters == {"ad-c": 1.0} for d in decisions)
    assert all("out of distribution: the mean similarity to the 10 nearest examples" in d.reason for d in decisions)
    assert router.calibration["coverage"] >= 0.99


def test_top_k_weights_come_from_the_calibrated_probabilities(world):
    router = fit(world, top_k=2, min_weight=0.0)
    emb = BagOfWords().embed(["w1 w2 w21 w22"])
    s = router.similarities(emb, ["w1 w2 w21 w22"])
    [d] = router.decide(s, torch.ones(1))
    p = torch.softmax(s[0] / router.temperature, 0)
    top = p.topk(2)
    assert d.adapters == pytest.approx({router.names[int(i)]: float(v / top.values.sum())
                                        for i, v in zip(top.indices, top.values)}, abs=1e-6)


def test_saved_router_loads_as_linear_and_routes_the_same(world):
    _, store, _, _, test = world
    router = fit(world, name="lin-saved")
    router.save(store)
    loaded = load_router(store, "lin-saved", encoder=BagOfWords())
    assert isinstance(loaded, LinearRouter) and loaded.kind == "linear"
    meta = loaded.to_meta()
    assert meta["type"] == LINEAR_TYPE and meta["l2"] == router.l2 and meta["lexical"]["seen_buckets"] > 0
    assert meta["examples"]["fit"]["ad-a"]["count"] == 32 and meta["examples"]["held_out"]["ad-a"]["count"] == 8
    texts = [t for ts in test.values() for t in ts] + sentences(OOD_WORDS, 3, "o")
    assert [d.to_dict() for d in loaded.route(texts)] == [d.to_dict() for d in router.route(texts)]


def test_a_replaced_adapter_is_refused_naming_it(world, tmp_path):
    base, _, adapters, examples, _ = world
    from adapterkit.store import AdapterStore

    store = AdapterStore(tmp_path / "s")
    for a in adapters:
        store.put(a)
    fit_linear("l1", adapters, examples, BagOfWords()).save(store)
    store.put(create_adapter("ad-b", base.model, LoraConfig(r=2, init="nonzero"), seed=9,
                             fingerprint=base.fingerprint, base_name=base.name, task="b"), overwrite=True)
    with pytest.raises(StaleRouterError, match="ad-b"):
        load_router(store, "l1", encoder=BagOfWords())
    lenient = load_router(store, "l1", encoder=BagOfWords(), strict=False)
    [d] = lenient.route(["w21 w22 w23 w24 w25"])
    assert d.fallback and "unusable" in d.reason and "ad-b" in d.reason


def test_bad_input_is_refused(world):
    _, _, adapters, examples, _ = world
    with pytest.raises(ConfigError, match=r"a linear router needs --neighbors >= 1"):
        fit(world, neighbors=0)
    with pytest.raises(ConfigError, match=r"l2 must be a positive number, got -1"):
        fit(world, l2=-1)
    with pytest.raises(ConfigError, match=r"no example texts for adapter\(s\) \['ad-c'\] \(a linear router needs"):
        fit_linear("x", adapters, {k: v for k, v in examples.items() if k != "ad-c"}, BagOfWords())
