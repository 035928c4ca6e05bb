"""The retrieval router's lexical channel: character n-gram TF-IDF against a hand-written reference,
its mix with the dense channel, the weight chosen on held-out texts, the store round trip, and bad
input with exact messages."""

import math
import random
import zlib

import pytest
import torch
from conftest import save_tiny

from adapterkit import ConfigError, LoraConfig, create_adapter, load_base
from adapterkit.errors import CorruptAdapterError
from adapterkit.route import fit_retrieval, load_router
from adapterkit.route.lexical import BUCKETS, Lexical
from adapterkit.store import AdapterStore

WORDS = [f"w{i}" for i in range(8)]


class BagOfWords:
    """Word counts over WORDS (both tasks below draw from the same words)."""
    name, fingerprint, max_length = "bag-of-words", "sha256:bow", 128

    def embed(self, texts):
        out = torch.zeros(len(texts), len(WORDS) + 1)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, WORDS.index(w) if w in WORDS else len(WORDS)] += 1
        return out

    def spec(self):
        return {"name": self.name, "fingerprint": self.fingerprint, "pooling": "mean", "max_length": 128}

    def check(self, spec):
        pass


class Blind(BagOfWords):
    """The same vector for every text: a dense channel that cannot tell any two prompts apart."""

    def embed(self, texts):
        return torch.ones(len(texts), 4)


def tweets(n, seed):
    rng = random.Random(seed)
    return [f"@user{rng.randint(0, 99)} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            + " https://t.co/x" for _ in range(n)]


def questions(n, seed):
    rng = random.Random(seed)
    return ["Which " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) + "?" for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lexical")
    base = load_base(str(save_tiny("llama", root / "tiny-llm")))
    store = AdapterStore(root / "store")
    adapters = []
    for i, task in enumerate(("tweets", "questions")):
        ad = create_adapter(f"ad-{task}", base.model, LoraConfig(r=2), seed=i, fingerprint=base.fingerprint,
                            base_name=base.name, task=task)
        store.put(ad)
        adapters.append(ad)
    examples = {"ad-tweets": tweets(40, "fit-t"), "ad-questions": questions(40, "fit-q")}
    held = {"ad-tweets": tweets(12, "held-t"), "ad-questions": questions(12, "held-q")}
    test = {"ad-tweets": tweets(30, "test-t"), "ad-questions": questions(30, "test-q")}
    return store, adapters, examples, held, test


def reference_vector(text, idf):
    """{bucket: weight}: unit tf-idf of case-kept character 1..4-grams of ' ' + squeezed text + ' '."""
    s = " " + " ".join(text.split()) + " "
    counts = {}
    for n in range(1, 5):
        for i in range(len(s) - n + 1):
            b = zlib.crc32(s[i:i + n].encode("utf-8")) % BUCKETS
            counts[b] = counts.get(b, 0) + 1
    v = {b: (1 + math.log(c)) * idf(b) for b, c in counts.items()}
    norm = math.sqrt(sum(x * x for x in v.values()))
    return {b: x / norm for b, x in v.items()}


def reference_idf(fit_texts):
    df = {}
    for t in fit_texts:
        for b in reference_vector(t, lambda b: 1.0):
            df[b] = df.get(b, 0) + 1
    m = len(fit_texts)
    return lambda b: math.log((1 + m) / (1 + df.get(b, 0))) + 1


def cos(u, v):
    return sum(x * v.get(b, 0.0) for b, x in u.items())


def test_tfidf_cosines_equal_a_hand_written_reference():
    fit_texts = ["Which film won?", "@ann loved it https://t.co/a", "it bites hard.", "Ünïcode  spaced   text"]
    queries = ["Which team won?", "@bob hated it", "", "Ünïcode text"]
    lex = Lexical.fit(fit_texts)
    idf = reference_idf(fit_texts)
    got = torch.sparse.mm(lex.vectors(queries), lex.vectors(fit_texts).t()).to_dense()
    want = torch.tensor([[cos(reference_vector(q, idf), reference_vector(f, idf)) if q.strip() else 0.0
                          for f in fit_texts] for q in queries])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(got[0, 0]) > 0.5 and float(got[2].abs().sum()) == 0.0      # an empty text has no n-grams


def accuracy(router, test):
    texts = [(n, t) for n, ts in test.items() for t in ts]
    return sum(d.top == n for (n, _), d in zip(texts, router.route([t for _, t in texts]))) / len(texts)


@pytest.mark.parametrize("neighbors", [5, 0])
def test_the_form_of_a_prompt_routes_it_where_the_dense_channel_is_blind(world, neighbors):
    _, adapters, examples, held, test = world
    dense = fit_retrieval("dense", adapters, examples, Blind(), held_out=held, lexical=False,
                          neighbors=neighbors, coverage=1.0)
    hybrid = fit_retrieval("hybrid", adapters, examples, Blind(), held_out=held, neighbors=neighbors,
                           coverage=1.0)
    dense.threshold = hybrid.threshold = -1.0       # routing only: OOD fallbacks are tested elsewhere
    assert accuracy(dense, test) == 0.5                      # every score ties: always the first adapter
    assert accuracy(hybrid, test) == 1.0
    cal = hybrid.calibration
    assert hybrid.lexical_weight == cal["lexical_weight"] > 0
    assert set(cal["lexical_weight_accuracy"]) == {"0.0", "0.25", "0.5", "1.0", "2.0"}
    assert cal["lexical_weight_accuracy"][str(hybrid.lexical_weight)] == max(cal["lexical_weight_accuracy"].values())


def test_scores_are_the_weighted_mean_of_the_dense_and_lexical_knn_scores(world):
    _, adapters, examples, held, test = world
    enc = BagOfWords()
    router = fit_retrieval("mix", adapters, examples, enc, held_out=held, neighbors=3, lexical_weight=0.5)
    assert router.lexical_weight == 0.5 and router.calibration["lexical_weight_accuracy"].keys() == {"0.5"}
    texts = test["ad-tweets"][:3] + test["ad-questions"][:3]
    emb = enc.embed(texts)
    center = torch.stack([enc.embed(examples[n]).mean(0) for n in router.names]).mean(0)
    z = torch.nn.functional.normalize(emb - center, dim=-1)
    idf = reference_idf([t for n in router.names for t in examples[n]])
    want = []
    for j, n in enumerate(router.names):
        dense = (z @ torch.nn.functional.normalize(enc.embed(examples[n]) - center, dim=-1).t()).topk(3, 1).values.mean(1)
        lex = torch.tensor([sorted((cos(reference_vector(t, idf), reference_vector(f, idf)) for f in examples[n]),
                                   reverse=True)[:3] for t in texts]).mean(1)
        want.append((dense + 0.5 * lex) / 1.5)
    torch.testing.assert_close(router.similarities(emb, texts), torch.stack(want, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError) as e:
        router.similarities(emb)
    assert str(e.value) == "router 'mix' has a lexical channel: pass the texts with their embeddings"


@pytest.mark.parametrize("neighbors", [4, 0])
def test_the_lexical_channel_survives_the_store(world, neighbors):
    store, adapters, examples, held, test = world
    enc = BagOfWords()
    router = fit_retrieval(f"saved{neighbors}", adapters, examples, enc, held_out=held, neighbors=neighbors,
                           lexical_weight=1.0)
    router.save(store, overwrite=True)
    again = load_router(store, f"saved{neighbors}", encoder=enc)
    texts = [t for ts in test.values() for t in ts[:5]]
    torch.testing.assert_close(again.similarities(enc.embed(texts), texts), router.similarities(enc.embed(texts), texts))
    assert again.lexical_weight == 1.0 and again.to_meta()["lexical"] == router.to_meta()["lexical"]
    assert router.to_meta()["lexical"]["rows"] == (80 if neighbors else 2)
    # a router written with another hashing scheme is refused, not misread
    import json

    from adapterkit.route.common import ROUTER_JSON, router_path

    path = router_path(store, f"saved{neighbors}") / ROUTER_JSON
    meta = json.loads(path.read_text())
    meta["lexical"]["buckets"] = 1 << 18
    path.write_text(json.dumps(meta))
    with pytest.raises(CorruptAdapterError) as e:
        load_router(store, f"saved{neighbors}", encoder=enc)
    assert str(e.value) == ("the router's lexical channel uses 262144 crc32 buckets; this adapterkit hashes into "
                            "1048576 crc32 buckets: refit the router")


def test_a_weight_of_zero_drops_the_channel_and_bad_weights_are_refused(world):
    _, adapters, examples, held, _ = world
    router = fit_retrieval("zero", adapters, examples, BagOfWords(), held_out=held, lexical_weight=0.0)
    assert router.lexical is None and router.to_meta()["lexical"] is None
    for kw, got in (({"lexical_weight": -1.0}, "-1.0"), ({"lexical_weight": float("nan")}, "nan"),
                    ({"lexical": False, "lexical_weight": 0.5}, "0.5")):
        with pytest.raises(ConfigError) as e:
            fit_retrieval("bad", adapters, examples, BagOfWords(), held_out=held, **kw)
        assert str(e.value) == f"lexical_weight must be a finite number >= 0 with the lexical channel on, got {got}"
