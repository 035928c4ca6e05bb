"""YAML merge recipes, validated with pydantic at the edge (`extra="forbid"`: a typo in a key is an
error that names its path, e.g. `inputs.1.wieght`).

    format_version: 1          # optional
    method: ties               # a merge method (api.METHODS) or "reversible"
    inputs:                    # store names, or adapter folders (relative to the recipe's folder)
      - adapter: sentiment
        weight: 1.0
      - adapter: ./adapters/topic
        weight: 0.5
        name: topic2           # optional: its name in the merge (default: the stored / saved name)
    parameters:                # the method's own parameters (weights come from inputs)
      density: 0.3
    rank: 32                   # output rank (reversible: the rank of each basis adapter;
                               #   its parameters: k, per_site, normalize)
    seed: 0                    # DARE masks and the randomized SVD

An input is read from the store when the store holds that name, else as a folder path. Errors
about an input name it as the recipe does (two folders holding adapters saved under one name are
told apart by their paths). Numbers follow YAML 1.2 (`1e-30` is a float; YAML 1.1 reads a string).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from ..core.adapter import Adapter, validate_name
from ..errors import AdapterNotFoundError, ConfigError, NonFiniteError
from .api import get_merge_method, merge_method_names, merge_with_report
from .common import content_fingerprint
from .reversible import merge_reversible

REVERSIBLE_PARAMS = ("k", "rank", "per_site", "normalize")    # merge_reversible's keyword parameters
MAX_BYTES = 1 << 20                                             # a recipe is a small text file


class _Loader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) that also reads YAML 1.2 floats: an exponent without a dot
    or without a sign (1e-30, 2E3, .5e1) is a float; YAML 1.1's resolver leaves them strings."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


class RecipeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(min_length=1)
    weight: float = Field(1.0, allow_inf_nan=False)
    name: Optional[str] = None          # its name in the merge (lineage); default: the stored / saved name

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: Optional[str]) -> Optional[str]:
        return value if value is None else validate_name(value)


class MergeRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = 1
    method: str
    inputs: list[RecipeInput] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    rank: Optional[PositiveInt] = None
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        valid = merge_method_names() + ["reversible"]
        if value not in valid:
            raise ValueError(f"unknown merge method {value!r}; valid methods: {', '.join(sorted(valid))}")
        return value

    @field_validator("parameters")
    @classmethod
    def _no_weights(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "weights" in value:
            raise ValueError("give each input's weight in inputs[].weight, not parameters.weights")
        return value

    def merge_params(self) -> dict[str, Any]:
        """Keyword arguments for merge(): parameters + weights, and rank / seed when the recipe sets them."""
        params = dict(self.parameters)
        accepted = set(REVERSIBLE_PARAMS) if self.method == "reversible" else set(get_merge_method(self.method).params)
        for key in ("rank", "seed"):
            if key not in self.model_fields_set:
                continue
            if key in params:
                raise ConfigError(f"{key} is given twice (top level and parameters.{key}); keep one")
            if key not in accepted:
                raise ConfigError(f"recipe key {key!r} does not apply to merge method {self.method!r} "
                                  f"(its parameters: {', '.join(sorted(['weights', *accepted]))})")
            params[key] = getattr(self, key)
        return {**params, "weights": [i.weight for i in self.inputs]}


def _format(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "recipe") -> MergeRecipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge recipe is a YAML mapping (method, inputs, ...), got "
                          f"{type(data).__name__}")
    try:
        return MergeRecipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid merge recipe ({exc.error_count()} error(s)):\n{_format(exc)}\n"
                          f"valid keys: {', '.join(MergeRecipe.model_fields)}; inputs[]: "
                          f"{', '.join(RecipeInput.model_fields)}") from exc


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a YAML recipe; a missing, binary, empty or non-YAML file is a ConfigError naming it."""
    path = Path(path)
    fix = "give a YAML merge recipe (method, inputs, ...; see `adapterkit merge --help`)"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read merge recipe {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"merge recipe {path} is over {MAX_BYTES >> 20} MiB: not a recipe; {fix}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"merge recipe {path} is not a text file (UTF-8); {fix}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:     # ValueError: e.g. a bad date
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"merge recipe {path} is empty; {fix}")
    return parse_recipe(data, str(path))


def resolve_input(ref: str, store: Any = None, base_dir: str | Path | None = None) -> Adapter:
    """A store name (if the store holds it), else an adapter folder (relative to base_dir)."""
    if store is not None and ref in store:
        return store.get(ref)
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir():
        return Adapter.load(path)
    where = f"the store at {store.root}" if store is not None else "no store"
    raise AdapterNotFoundError(f"merge input {ref!r} is neither an adapter in {where} nor an adapter folder "
                               f"({path} does not exist)")


def _load_input(item: RecipeInput, store: Any, base_dir: str | Path | None) -> Adapter:
    """resolve_input, checked finite, renamed to item.name; errors name the input as the recipe does."""
    try:
        adapter = resolve_input(item.adapter, store, base_dir).check_finite(torch.float32)
    except NonFiniteError as exc:
        raise NonFiniteError(f"merge input {item.adapter!r}: {exc}") from None
    return adapter if item.name is None else dataclasses.replace(adapter, name=item.name)


def _check_distinct(items: list[RecipeInput], adapters: list[Adapter]) -> None:
    """Each input once, with a name of its own; named by the recipe's refs (two folders may hold
    adapters saved under one name)."""
    fps = [content_fingerprint(a) for a in adapters]
    for j, (item, a) in enumerate(zip(items, adapters)):
        for i in range(j):
            first, other = items[i].adapter, item.adapter
            if first == other and adapters[i].name == a.name:
                raise ConfigError(f"merge input {first!r} is given more than once; list each input once "
                                  "(raise its weight instead of repeating it)")
            if fps[i] == fps[j]:
                raise ConfigError(f"merge inputs {first!r} and {other!r} are the same adapter (identical tensors, "
                                  f"{fps[j]}); list it once and raise its weight instead")
            if adapters[i].name == a.name:
                raise ConfigError(f"merge inputs {first!r} and {other!r} are different adapters that share the "
                                  f"name {a.name!r}; give each a distinct name in the recipe (`name:` next to "
                                  f"`adapter:`, e.g. name: {a.name}-2)")


def run_recipe(recipe: MergeRecipe, name: str, *, store: Any = None, base_dir: str | Path | None = None):
    """Load the inputs and merge. Returns (Adapter, MergeReport), or a ReversibleMerge."""
    adapters = [_load_input(i, store, base_dir) for i in recipe.inputs]
    _check_distinct(recipe.inputs, adapters)
    params = recipe.merge_params()
    if recipe.method == "reversible":
        weights = params.pop("weights")
        if any(w != 1.0 for w in weights):
            raise ConfigError("reversible merging takes no input weights (each task is recovered on its own)")
        unknown = sorted(set(params) - set(REVERSIBLE_PARAMS))
        if unknown or "k" not in params:
            raise ConfigError(f"reversible merging takes parameters k (required: the number of basis "
                              f"adapters), rank, per_site (default true) and normalize (default false); "
                              f"got {sorted(params)}")
        return merge_reversible(adapters, name=name, **params)
    return merge_with_report(adapters, recipe.method, name=name, **params)
