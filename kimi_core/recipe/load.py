"""Load a recipe: YAML -> cluster profile -> `--set` overrides -> typed sections -> cross-field rules."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from kimi_core.recipe.rules import check_rules
from kimi_core.recipe.sections import ClusterSection, Recipe

BASE_DIR_ENV = "KIMI_GRPO_BASE_DIR"
#: Keys a cluster profile may set (everything of the cluster section but the job's node count).
PROFILE_KEYS = frozenset(ClusterSection.model_fields) - {"num_nodes"}


class _Loader(yaml.SafeLoader):
    """Safe YAML, except that `1e-3` is the float it is in YAML 1.2 (PyYAML's 1.1 rules read it as a
    string unless it has a dot: `1.0e-3`)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


class RecipeError(ValueError):
    """An invalid recipe or profile; `problems` holds one message per offending key or rule."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid recipe {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(str(path), [f"{what} file not found: {path}"])
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise RecipeError(str(path), [f"not valid YAML: {err}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"the {what} must be a YAML mapping at the top level"])
    return data


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model found by walking `loc` from `Recipe` (None if it leads elsewhere)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _section_type(annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _section_type(annotation: Any) -> Any:
    """The BaseModel inside `X`, `X | None` or `tuple[X, ...]`, else the annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def _format_error(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        section = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int)) or "the recipe"
        valid = ", ".join(sorted(parent.model_fields)) if parent else "?"
        return f"{path}: unknown key in section '{section}'; valid keys: {valid}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    given = error.get("input")
    shown = repr(given) if not isinstance(given, dict) else "a mapping"
    return f"{path}: {error['msg']} (got {shown})"


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError("--set", [f"{assignment!r}: expected section.key=value"])
    parts = key.strip().split(".")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError("--set", [f"{key}: value {raw!r} is not valid YAML: {err}"]) from None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError("--set", [f"{'.'.join(parts[: i + 1])} is not a section; cannot set {key}"])
        node = child
    node[parts[-1]] = value


def load_profile(profile: str, *, recipe_path: Path | None = None) -> dict[str, Any]:
    """A cluster profile by path or by name (`configs/clusters/<name>.yaml` beside the recipe or the cwd)."""
    candidates = [Path(profile)]
    if not profile.endswith((".yaml", ".yml")):
        roots = [Path.cwd() / "configs"]
        if recipe_path is not None:
            roots.insert(0, recipe_path.resolve().parent)
        candidates += [root / "clusters" / f"{profile}.yaml" for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            data = _read_yaml(candidate, "cluster profile")
            unknown = sorted(set(data) - PROFILE_KEYS - {"description"})
            if unknown:
                raise RecipeError(
                    str(candidate),
                    [f"cluster profile key(s) {unknown} unknown; valid keys: {', '.join(sorted(PROFILE_KEYS))}"],
                )
            data.pop("description", None)
            return data
    tried = ", ".join(str(c) for c in candidates)
    raise RecipeError(profile, [f"cluster profile {profile!r} not found (looked for {tried})"])


def _merge_profile(data: dict[str, Any], profile: dict[str, Any], name: str) -> list[str]:
    cluster = data.setdefault("cluster", {})
    if not isinstance(cluster, dict):
        return ["cluster: must be a mapping"]
    problems = []
    for key, value in profile.items():
        if key in cluster and cluster[key] != value:
            problems.append(
                f"cluster.{key}: the recipe says {cluster[key]!r} but cluster profile {name!r} says {value!r}; "
                "remove one of them"
            )
        cluster[key] = value
    return problems


def load_recipe(
    path: str | os.PathLike[str],
    *,
    overrides: list[str] | tuple[str, ...] = (),
    cluster: str | None = None,
    base_dir: str | None = None,
) -> Recipe:
    """Load and validate a recipe.

    Order: the YAML file, then the cluster profile (`--cluster`), then `--set section.key=value`
    overrides, then `$KIMI_GRPO_BASE_DIR`, then `base_dir`. Raises `RecipeError` naming every
    offending key path and rule.
    """
    source = Path(path)
    data = _read_yaml(source, "recipe")
    problems: list[str] = []
    if cluster:
        problems += _merge_profile(data, load_profile(cluster, recipe_path=source), cluster)
    for assignment in overrides:
        _apply_override(data, assignment)
    for value in (os.environ.get(BASE_DIR_ENV), base_dir):
        if value:
            data.setdefault("cluster", {})["base_dir"] = value
    if problems:
        raise RecipeError(str(source), problems)
    return recipe_from_dict(data, source=str(source))


def recipe_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> Recipe:
    """Validate an already-merged mapping (types, unknown keys, then cross-field rules)."""
    try:
        recipe = Recipe.model_validate(copy.deepcopy(data))
    except ValidationError as err:
        raise RecipeError(source, [_format_error(e) for e in err.errors()]) from None
    problems = check_rules(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (lists for tuples), ready for YAML or MLflow params."""
    data: dict[str, Any] = json.loads(recipe.model_dump_json())
    return data


def recipe_hash(recipe: Recipe) -> str:
    """Content hash of the resolved recipe, ignoring where it runs (base_dir) and how far (num_rollout)."""
    data = recipe_to_dict(recipe)
    data["cluster"].pop("base_dir", None)
    data["rollout"].pop("num_rollout", None)  # extending a run with --num-rollout is a resume
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
