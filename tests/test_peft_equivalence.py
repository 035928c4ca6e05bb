"""adapterkit and PEFT agree: same adapters, same numbers, both directions.

Every test uses tiny random models from conftest (no downloads). PEFT's LoRA is built with
init_lora_weights=False so B is non-zero, and each test first checks that the adapter really
moves the output, so no comparison passes vacuously.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapterkit
from adapterkit import (AdapterRuntime, BaseMismatchError, ConfigError, CorruptAdapterError,
                        UnsupportedError, load_base)

from conftest import TARGETS, input_ids, save_tiny, tiny_llama

peft = pytest.importorskip("peft")

KINDS = ["llama", "bert", "gpt2"]
ATOL, RTOL = 1e-5, 1e-4
MIN_EFFECT = 1e-2          # an adapter must move some output by at least this much
BATCH, LENGTH = 3, 6

# Per architecture: a rank_pattern / alpha_pattern mixing a leaf-name key with a layer-specific
# dotted key (PEFT matches a key against the module path or a dotted suffix of it).
PATTERNS = {
    "llama": dict(rank_pattern={"q_proj": 2, "model.layers.1.self_attn.v_proj": 6},
                  alpha_pattern={"k_proj": 3, "model.layers.0.self_attn.o_proj": 16}),
    "bert": dict(rank_pattern={"query": 2, "encoder.layer.1.attention.self.value": 6},
                 alpha_pattern={"key": 3, "encoder.layer.0.attention.output.dense": 16}),
    "gpt2": dict(rank_pattern={"c_attn": 2, "transformer.h.1.mlp.c_proj": 6},
                 alpha_pattern={"attn.c_proj": 3, "transformer.h.0.mlp.c_proj": 16}),
}

# PEFT -> adapterkit variants: (id, LoraConfig kwargs beyond the defaults, whether to add PATTERNS)
PEFT_VARIANTS = [
    ("plain", dict(r=4, lora_alpha=8), False),
    ("alpha-ne-r", dict(r=3, lora_alpha=5), False),
    ("rslora", dict(r=4, lora_alpha=8, use_rslora=True), False),
    ("patterns", dict(r=4, lora_alpha=8), True),
    ("rslora+patterns", dict(r=4, lora_alpha=8, use_rslora=True), True),
    ("dropout", dict(r=4, lora_alpha=8, lora_dropout=0.1), False),    # eval: no dropout either side
    ("task-type", dict(r=4, lora_alpha=8, task_type="per-kind"), False),
]
TASK_TYPES = {"llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "gpt2": "CAUSAL_LM"}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def folders(tmp_path):
    """kind -> saved tiny model folder (saved once per test); each load_base() is a separate copy."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = save_tiny(kind, tmp_path / f"base-{kind}")
        return cache[kind]

    return get


def fresh(folders, kind: str):
    return load_base(str(folders(kind)))


def outputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What we compare: logits for the LM heads; last hidden state and pooler output for BERT."""
    with torch.no_grad():
        out = model(input_ids=ids)
    if getattr(out, "logits", None) is not None:
        return {"logits": out.logits}
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def assert_close(got: dict, want: dict, rows=slice(None)) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key][rows], want[key][rows], atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}: {m}")


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def peft_lora(model, kind: str, *, seed: int = 0, targets=None, **kwargs):
    """A PEFT LoRA with non-zero B (init_lora_weights=False), seeded."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(target_modules=list(targets or TARGETS[kind]), init_lora_weights=False,
                             fan_in_fan_out=(kind == "gpt2"), **kwargs)
    return peft.get_peft_model(model, config)


def save_peft(folders, kind: str, path: Path, *, seed: int = 0, **kwargs) -> tuple[Path, object]:
    """Build a PEFT LoRA on a fresh copy of the base and save it; returns (folder, peft model)."""
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    pm = peft_lora(fresh(folders, kind).model, kind, seed=seed, **kwargs)
    pm.eval()
    pm.save_pretrained(str(path))
    return path, pm


def runtime_with(folders, kind: str, *adapters, capacity: int = 8) -> AdapterRuntime:
    rt = AdapterRuntime.from_base(fresh(folders, kind), capacity=capacity)
    for adapter in adapters:
        rt.add(adapter)
    return rt


def run_rows(rt: AdapterRuntime, rows, ids: torch.Tensor, kernel: str = "auto") -> dict[str, torch.Tensor]:
    with torch.no_grad(), rt.batch(rows, kernel=kernel):
        return outputs(rt.model, ids)


def assert_state_close(model, reference) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")


def assert_state_equal(model, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed == [], f"weights not restored bit for bit: {changed}"


def peft_sites(pm) -> set[str]:
    """Module paths (inside the base model) that PEFT wrapped with LoRA."""
    inner = pm.base_model.model
    return {name for name, m in inner.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}


# --------------------------------------------------------------------------- 1. PEFT -> adapterkit

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant, kwargs, patterns", PEFT_VARIANTS, ids=[v[0] for v in PEFT_VARIANTS])
def test_peft_adapter_runs_like_peft(folders, tmp_path, kind, variant, kwargs, patterns):
    kwargs = {**kwargs, **(PATTERNS[kind] if patterns else {})}
    if kwargs.get("task_type") == "per-kind":
        kwargs["task_type"] = TASK_TYPES[kind]
    path, pm = save_peft(folders, kind, tmp_path / "peft", **kwargs)
    ids = input_ids(BATCH, LENGTH, seed=1)
    want = outputs(pm, ids)
    with pm.disable_adapter():
        bare = outputs(pm, ids)
    assert max_diff(want, bare) > MIN_EFFECT, "the PEFT adapter must change the output"

    adapter = adapterkit.Adapter.load(path, name="p")
    assert set(adapter.sites) == peft_sites(pm)
    if patterns:
        # The patterns really took effect (on both sides): several ranks, each as PEFT built it.
        assert len(adapter.ranks()) > 1
    inner = dict(pm.base_model.model.named_modules())
    for site in adapter.sites:
        module = inner[site]
        assert adapter.config.rank(site) == module.r["default"], site
        assert adapter.config.scale(site) == pytest.approx(module.scaling["default"], rel=1e-12), site

    rt = runtime_with(folders, kind, adapter)
    assert_close(outputs(rt.model, ids), bare)          # no batch: the bare base
    assert_close(run_rows(rt, ["p"] * BATCH, ids), want)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_peft_config_key_warns_and_still_loads(folders, tmp_path, kind):
    path, pm = save_peft(folders, kind, tmp_path / "peft")
    cfg_file = path / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["my_custom_key"] = 1
    cfg_file.write_text(json.dumps(data))

    with pytest.warns(UserWarning, match=r"unknown PEFT config key\(s\) \['my_custom_key'\]"):
        adapter = adapterkit.Adapter.load(path, name="p")

    ids = input_ids(BATCH, LENGTH, seed=2)
    assert_close(run_rows(runtime_with(folders, kind, adapter), ["p"] * BATCH, ids), outputs(pm, ids))


WRAPPER_PATTERNS = [
    pytest.param({}, id="no-patterns"),
    pytest.param(dict(rank_pattern={"encoder.layer.1.attention.self.value": 6}, alpha_pattern={"query": 16}),
                 id="suffix-pattern-keys"),
    # PEFT matches these against its own module paths, which start with "bert.".
    # (patterns are matched against the adapter's own site names, not the runtime's module names)
    pytest.param(dict(alpha_pattern={"bert.encoder.layer.0.attention.self.query": 16}), id="full-path-alpha-key"),
    pytest.param(dict(rank_pattern={"bert.encoder.layer.1.attention.self.value": 6}), id="full-path-rank-key"),
]


@pytest.mark.parametrize("patterns", WRAPPER_PATTERNS)
def test_peft_adapter_saved_from_a_wrapper_class_loads_on_the_bare_encoder(folders, tmp_path, patterns):
    """PEFT keys 'base_model.model.bert.encoder...' (BertForSequenceClassification) map onto the
    BertModel base by dropping the leading component; routed and merged outputs match PEFT's."""
    from transformers import BertForSequenceClassification

    cls_model = BertForSequenceClassification.from_pretrained(str(folders("bert"))).eval()
    pm = peft_lora(cls_model, "bert", targets=["query", "value"], r=4, lora_alpha=8, **patterns)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    adapter = adapterkit.Adapter.load(tmp_path / "peft", name="p")
    assert all(s.startswith("bert.") for s in adapter.sites)
    assert len(adapter.ranks()) == (2 if "rank_pattern" in patterns else 1)

    ids = input_ids(BATCH, LENGTH, seed=3)
    with torch.no_grad():
        want = pm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        with pm.disable_adapter():
            bare = pm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert (want - bare).abs().max() > MIN_EFFECT
    rt = runtime_with(folders, "bert", adapter)
    got = run_rows(rt, ["p"] * BATCH, ids)["last_hidden_state"]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    rt.merge("p")
    torch.testing.assert_close(outputs(rt.model, ids)["last_hidden_state"], want, atol=ATOL, rtol=RTOL)


def test_peft_adapter_saved_from_the_inner_model_loads_on_the_lm(folders, tmp_path):
    """PEFT keys 'base_model.model.layers...' (bare LlamaModel) map onto LlamaForCausalLM by
    adding the leading 'model.' component."""
    base_for_peft = fresh(folders, "llama").model
    pm = peft_lora(base_for_peft.model, "llama", r=4, lora_alpha=8)   # the inner LlamaModel
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    adapter = adapterkit.Adapter.load(tmp_path / "peft", name="p")
    assert all(s.startswith("layers.") for s in adapter.sites)

    ids = input_ids(BATCH, LENGTH, seed=4)
    with torch.no_grad():
        want = base_for_peft(input_ids=ids).logits        # the LM head over PEFT's wrapped layers
        with pm.disable_adapter():
            bare = base_for_peft(input_ids=ids).logits
    assert (want - bare).abs().max() > MIN_EFFECT
    got = run_rows(runtime_with(folders, "llama", adapter), ["p"] * BATCH, ids)["logits"]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- 2. adapterkit -> PEFT

REGEX_TARGETS = {"llama": r".*\.(q_proj|v_proj|down_proj)", "bert": r".*\.attention\.self\.(query|value)",
                 "gpt2": r"transformer\.h\.1\.(attn|mlp)\.c_\w+"}
EXCLUDED = {"llama": ["model.layers.0.self_attn.q_proj"], "bert": ["encoder.layer.0.attention.self.query"],
            "gpt2": ["transformer.h.0.attn.c_attn"]}

# adapterkit -> PEFT variants: (id, LoraConfig kwargs; "per-kind" values come from the tables above)
AK_VARIANTS = [
    ("plain", dict(r=4, alpha=8)),
    ("float-alpha+dropout", dict(r=3, alpha=5.5, dropout=0.1)),
    ("rslora+patterns", dict(r=4, alpha=8, use_rslora=True, rank_pattern="per-kind", alpha_pattern="per-kind")),
    ("all-linear", dict(r=2, alpha=4, target_modules="all-linear")),
    ("regex-targets", dict(r=4, alpha=8, target_modules="per-kind")),
    ("exclude-modules", dict(r=4, alpha=8, exclude_modules="per-kind")),
]
PER_KIND = {"rank_pattern": lambda k: PATTERNS[k]["rank_pattern"],
            "alpha_pattern": lambda k: PATTERNS[k]["alpha_pattern"],
            "target_modules": REGEX_TARGETS.get, "exclude_modules": EXCLUDED.get}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant, kwargs", AK_VARIANTS, ids=[v[0] for v in AK_VARIANTS])
def test_adapterkit_adapter_runs_like_peft(folders, tmp_path, kind, variant, kwargs):
    base = fresh(folders, kind)
    kwargs = {"target_modules": TARGETS[kind], **kwargs}
    kwargs = {k: PER_KIND[k](kind) if v == "per-kind" else v for k, v in kwargs.items()}
    config = adapterkit.LoraConfig(init="nonzero", init_std=0.1, **kwargs)
    adapter = adapterkit.create_adapter("ak", base.model, config, seed=1, fingerprint=base.fingerprint)
    adapter.save(tmp_path / "ak")

    rt = AdapterRuntime.from_base(base)
    rt.add(adapter)
    ids = input_ids(BATCH, LENGTH, seed=5)
    got = run_rows(rt, ["ak"] * BATCH, ids)
    with torch.no_grad(), rt.disabled():
        bare = outputs(rt.model, ids)
    assert max_diff(got, bare) > MIN_EFFECT, "the adapter must change the output"

    pm = peft.PeftModel.from_pretrained(fresh(folders, kind).model, str(tmp_path / "ak")).eval()
    # PEFT built exactly our sites, ranks and scales, and loaded exactly our tensors.
    assert peft_sites(pm) == set(adapter.sites)
    inner = dict(pm.base_model.model.named_modules())
    for site, parts in adapter.tensors.items():
        module = inner[site]
        assert module.scaling["default"] == pytest.approx(config.scale(site), rel=1e-12), site
        assert torch.equal(module.lora_A["default"].weight, parts["lora_A"]), site
        assert torch.equal(module.lora_B["default"].weight, parts["lora_B"]), site
    assert_close(outputs(pm, ids), got)

    # And back: PEFT re-saves it (no adapterkit.json now), adapterkit reads the same adapter.
    pm.save_pretrained(str(tmp_path / "back"))
    back = adapterkit.Adapter.load(tmp_path / "back", name="back")
    assert back.tensors.keys() == adapter.tensors.keys()
    for site, parts in adapter.tensors.items():
        assert back.config.scale(site) == pytest.approx(config.scale(site), rel=1e-12), site
        assert all(torch.equal(back.tensors[site][k], t) for k, t in parts.items()), site
    rt.add(back)
    assert_close(run_rows(rt, ["back"] * BATCH, ids), got)


# --------------------------------------------------------------------------- 3. mixed batch

# Three PEFT adapters of different seeds and ranks (the runtime pads its stacks to the max rank);
# "c" uses rsLoRA and adapts only some of the modules the others adapt.
MIXED = {"a": dict(seed=11, r=2, lora_alpha=4), "b": dict(seed=12, r=4, lora_alpha=8),
         "c": dict(seed=13, r=3, lora_alpha=7, use_rslora=True)}
SUBSET = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}
ROWS = ["a", "b", None, "c", "a", "c", None]             # odd batch size 7, two rows without adapter


def peft_trio(folders, tmp_path, kind):
    """Save the MIXED adapters; return their folders and one PeftModel holding all three."""
    paths = {}
    for name, kw in MIXED.items():
        targets = SUBSET[kind] if name == "c" else None
        paths[name] = save_peft(folders, kind, tmp_path / name, targets=targets, **kw)[0]
    pm = peft.PeftModel.from_pretrained(fresh(folders, kind).model, str(paths["a"]), adapter_name="a")
    for name in ("b", "c"):
        pm.load_adapter(str(paths[name]), adapter_name=name)
    return paths, pm.eval()


def peft_outputs(pm, names, ids) -> dict:
    """PEFT's output with each adapter active alone; None: adapters disabled."""
    want = {}
    for name in names:
        pm.set_adapter(name)
        want[name] = outputs(pm, ids)
    with pm.disable_adapter():
        want[None] = outputs(pm, ids)
    return want


ROUTINGS = [pytest.param(kind, per_token, id=f"{kind}-{'per-token' if per_token else 'per-row'}")
            for kind in KINDS for per_token in (False, True)]


@pytest.mark.parametrize("kind, per_token", ROUTINGS)
@pytest.mark.parametrize("kernel", ["dense", "gather", "segment"])
def test_mixed_batch_matches_peft_row_by_row(folders, tmp_path, kind, kernel, per_token):
    paths, pm = peft_trio(folders, tmp_path, kind)
    # capacity 2 < 3 adapters: the third add grows every site's slot stacks
    rt = runtime_with(folders, kind, *(adapterkit.Adapter.load(p, name=n) for n, p in paths.items()), capacity=2)
    ids = input_ids(len(ROWS), LENGTH, seed=6)
    if per_token:   # the same routing given token by token (every token of a row: the row's adapter)
        with torch.no_grad(), rt.batch([r for r in ROWS for _ in range(LENGTH)], kernel=kernel, per_token=True):
            if kind == "bert":
                # BertModel's pooler.dense (a "dense" target) sees one vector per row, so per-token
                # ids cannot apply there: a clear error, never a guess.
                with pytest.raises(ConfigError, match=rf"built for {len(ROWS) * LENGTH} tokens but a module "
                                                      rf"got {len(ROWS)}"):
                    outputs(rt.model, ids)
                return
            got = outputs(rt.model, ids)
    else:
        got = run_rows(rt, ROWS, ids, kernel=kernel)

    want = peft_outputs(pm, MIXED, ids)
    # The three adapters differ from each other and from the base, so routing errors would show.
    for x, y in [("a", "b"), ("a", "c"), ("b", "c"), ("a", None), ("b", None), ("c", None)]:
        assert max_diff(want[x], want[y]) > MIN_EFFECT, (x, y)
    for i, name in enumerate(ROWS):
        assert_close(got, want[name], rows=slice(i, i + 1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel", ["dense", "gather", "segment"])
def test_slot_reuse_after_remove_matches_peft(folders, tmp_path, kind, kernel):
    """remove('b') then add a different adapter (bigger rank, fewer sites) into the freed slot:
    nothing of 'b' may leak into the new adapter's rows or the others'."""
    paths, pm = peft_trio(folders, tmp_path, kind)
    paths["d"] = save_peft(folders, kind, tmp_path / "d", seed=14, r=6, lora_alpha=3, targets=SUBSET[kind])[0]
    pm.load_adapter(str(paths["d"]), adapter_name="d")
    rt = runtime_with(folders, kind, *(adapterkit.Adapter.load(paths[n], name=n) for n in "abc"))
    slot_b = rt.slot("b")
    rt.remove("b")
    assert rt.add(adapterkit.Adapter.load(paths["d"], name="d")) == slot_b

    rows = ["d", "a", None, "c", "d", "a", "c"]
    ids = input_ids(len(rows), LENGTH, seed=12)
    got = run_rows(rt, rows, ids, kernel=kernel)
    want = peft_outputs(pm, "acd", ids)
    assert max_diff(want["d"], want[None]) > MIN_EFFECT
    for i, name in enumerate(rows):
        assert_close(got, want[name], rows=slice(i, i + 1))


# Weighted rows vs PEFT's add_weighted_adapter, which builds an adapter whose delta is exactly
# sum_i w_i * scale_i * B_i A_i ("cat"; with one adapter PEFT uses "linear": sqrt(w * scale) on
# each factor, so w > 0). PEFT copies the first listed adapter's use_rslora onto the combined one
# (whose alpha = r), so the first listed adapter must not be rsLoRA ("c").
MIXTURES = {"ab": {"a": 0.7, "b": -0.3}, "bc": {"b": 1.0, "c": 0.5}, "abc": {"a": 0.2, "b": 0.3, "c": 1.5},
            "half-b": {"b": 0.5}}
MULTI_ROWS = ["ab", "a", None, "bc", "abc", "ab", "half-b"]      # several adapters per row
SINGLE_ROWS = ["half-b", "a", None, "c", "half-b", "b", "a"]      # one weighted adapter per row
WEIGHTED_CASES = [("dense", MULTI_ROWS), ("gather", MULTI_ROWS),
                  ("dense", SINGLE_ROWS), ("gather", SINGLE_ROWS), ("segment", SINGLE_ROWS)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel, rows", WEIGHTED_CASES,
                         ids=[f"{k}-{'multi' if r is MULTI_ROWS else 'single'}" for k, r in WEIGHTED_CASES])
def test_weighted_rows_match_peft_weighted_adapter(folders, tmp_path, kind, kernel, rows):
    paths, pm = peft_trio(folders, tmp_path, kind)
    rt = runtime_with(folders, kind, *(adapterkit.Adapter.load(p, name=n) for n, p in paths.items()))
    ids = input_ids(len(rows), LENGTH, seed=9)
    got = run_rows(rt, [MIXTURES.get(r, r) for r in rows], ids, kernel=kernel)

    for mix, weights in MIXTURES.items():
        pm.add_weighted_adapter(list(weights), list(weights.values()), mix, combination_type="cat")
    want = peft_outputs(pm, [*MIXED, *MIXTURES], ids)
    for mix, weights in MIXTURES.items():
        for single in weights:
            assert max_diff(want[mix], want[single]) > MIN_EFFECT, (mix, single)
    for i, name in enumerate(rows):
        assert_close(got, want[name], rows=slice(i, i + 1))


# --------------------------------------------------------------------------- 4. merge

@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_peft_merge_and_unload(folders, tmp_path, kind):
    path, _ = save_peft(folders, kind, tmp_path / "peft", r=4, lora_alpha=8, **PATTERNS[kind])
    rt = runtime_with(folders, kind, adapterkit.Adapter.load(path, name="p"))
    before = {k: v.detach().clone() for k, v in rt.model.state_dict().items()}
    ids = input_ids(BATCH, LENGTH, seed=7)
    bare = outputs(rt.model, ids)
    routed = run_rows(rt, ["p"] * BATCH, ids)

    rt.merge("p")
    assert rt.merged == ["p"]
    merged = outputs(rt.model, ids)                     # no batch: the merged base alone
    assert max_diff(merged, bare) > MIN_EFFECT

    pm = peft.PeftModel.from_pretrained(fresh(folders, kind).model, str(path)).eval()
    peft_merged = pm.merge_and_unload()
    assert_close(merged, outputs(peft_merged, ids))
    assert_close(merged, routed)                        # merged == routed through the adapter
    assert_state_close(rt.model, peft_merged)

    # export_merged writes the same merged model, and leaves the runtime as it was (merged).
    exported = rt.export_merged(tmp_path / "exported")
    assert rt.merged == ["p"]
    assert_close(outputs(load_base(str(exported)).model, ids), merged)

    rt.unmerge()
    assert rt.merged == []
    assert_state_equal(rt.model, before)
    assert_close(outputs(rt.model, ids), bare)
    assert_close(run_rows(rt, ["p"] * BATCH, ids), routed)

    # export_merged from the unmerged runtime: merges for the write, then restores bit for bit.
    exported = rt.export_merged(tmp_path / "exported-2", adapters=["p"])
    assert rt.merged == []
    assert_state_equal(rt.model, before)
    assert_close(outputs(load_base(str(exported)).model, ids), merged)


@pytest.mark.parametrize("kind", KINDS)
def test_weighted_merge_of_several_adapters_matches_peft(folders, tmp_path, kind):
    """merge(a, 0.7); merge(b, -0.3); merge(c, 1.5) == PEFT's cat combination merged; then one
    unmerge() restores every weight bit for bit."""
    weights = {"a": 0.7, "b": -0.3, "c": 1.5}
    paths, pm = peft_trio(folders, tmp_path, kind)
    rt = runtime_with(folders, kind, *(adapterkit.Adapter.load(p, name=n) for n, p in paths.items()))
    before = {k: v.detach().clone() for k, v in rt.model.state_dict().items()}
    ids = input_ids(BATCH, LENGTH, seed=10)
    bare = outputs(rt.model, ids)

    for name, w in weights.items():
        rt.merge(name, weight=w)
    assert rt.merged == list(weights)
    merged = outputs(rt.model, ids)
    assert max_diff(merged, bare) > MIN_EFFECT

    pm.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="cat")
    peft_merged = pm.merge_and_unload(adapter_names=["mix"])
    assert_close(merged, outputs(peft_merged, ids))
    assert_state_close(rt.model, peft_merged)

    rt.unmerge()
    assert_state_equal(rt.model, before)
    assert_close(outputs(rt.model, ids), bare)


# --------------------------------------------------------------------------- 5. inputs refused

def test_a_peft_method_adapterkit_lacks_is_refused_by_name(folders, tmp_path):
    """A real LoHa folder (PEFT's own save): refused naming the method, never read as LoRA or IA3."""
    model = fresh(folders, "llama").model
    peft.get_peft_model(model, peft.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(tmp_path / "loha"))
    with pytest.raises(UnsupportedError, match=r"PEFT method 'LOHA' is not supported; adapterkit reads PEFT IA3, "
                                               r"LORA adapters"):
        adapterkit.Adapter.load(tmp_path / "loha")


def test_peft_dora_adapter_is_refused(folders, tmp_path):
    path, _ = save_peft(folders, "llama", tmp_path / "dora", use_dora=True)
    assert json.loads((path / "adapter_config.json").read_text())["use_dora"] is True
    with pytest.raises(UnsupportedError, match=r"DoRA \(use_dora=true\) is not supported"):
        adapterkit.Adapter.load(path)


TRUNCATIONS = {
    "empty": lambda n: 0,
    "half-length-prefix": lambda n: 4,
    "length-prefix-only": lambda n: 8,
    "inside-header": lambda n: 40,
    "half": lambda n: n // 2,
    "last-byte-missing": lambda n: n - 1,
}


@pytest.mark.parametrize("cut", list(TRUNCATIONS))
def test_truncated_peft_weights_are_corrupt(folders, tmp_path, cut):
    path, _ = save_peft(folders, "llama", tmp_path / "peft")
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:TRUNCATIONS[cut](len(data))])
    with pytest.raises(CorruptAdapterError, match=r"not a readable safetensors file"):
        adapterkit.Adapter.load(path)


def _wide_llama(path: Path) -> Path:
    tiny_llama(hidden_size=48).save_pretrained(str(path))
    return path


def _deep_llama(path: Path) -> Path:
    tiny_llama(num_hidden_layers=3).save_pretrained(str(path))
    return path


def _peft_from(folder: Path, kind: str, out: Path) -> adapterkit.Adapter:
    pm = peft_lora(load_base(str(folder)).model, kind, r=4, lora_alpha=8)
    pm.save_pretrained(str(out))
    return adapterkit.Adapter.load(out, name="other")


def _other_llama_seed(tmp_path: Path) -> adapterkit.Adapter:
    other = load_base(str(save_tiny("llama", tmp_path / "llama-seed1", seed=1)))
    config = adapterkit.LoraConfig(r=4, alpha=8, target_modules=TARGETS["llama"], init="nonzero")
    return adapterkit.create_adapter("other", other.model, config, fingerprint=other.fingerprint)


FOREIGN = {
    # id: (adapter for another base, what the error says)
    "llama-hidden-48": (lambda tmp: _peft_from(_wide_llama(tmp / "wide"), "llama", tmp / "a"),
                        r"does not fit this base at model\.layers\.0\..*it was made for another base model"),
    "llama-3-layers": (lambda tmp: _peft_from(_deep_llama(tmp / "deep"), "llama", tmp / "a"),
                       r"targets module\(s\) \['model\.layers\.2\..*that this base does not have"),
    "gpt2-adapter": (lambda tmp: _peft_from(save_tiny("gpt2", tmp / "gpt2"), "gpt2", tmp / "a"),
                     r"targets module\(s\) \['transformer\.h\.0\..*that this base does not have"),
    "bert-adapter": (lambda tmp: _peft_from(save_tiny("bert", tmp / "bert"), "bert", tmp / "a"),
                     r"targets module\(s\) \['encoder\.layer\.0\..*that this base does not have"),
    "same-shapes-other-weights": (_other_llama_seed, r"adapter 'other' was made for base .*load it onto its own base"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_adapter_for_another_base_is_refused(folders, tmp_path, case):
    make, message = FOREIGN[case]
    adapter = make(tmp_path)
    rt = AdapterRuntime.from_base(fresh(folders, "llama"))
    ids = input_ids(BATCH, LENGTH, seed=8)
    bare = outputs(rt.model, ids)
    with pytest.raises(BaseMismatchError, match=message):
        rt.add(adapter)
    # Refused before anything was attached: no slot, no hook, same outputs.
    assert rt.names == []
    assert not any(m._forward_hooks for m in rt.model.modules())
    assert_close(outputs(rt.model, ids), bare)
