"""Owners and code versions of the assets, derived from the source that computes each asset.

Owns `source_version(*modules)`: a hash of the modules' syntax trees without docstrings (comments, layout
and documentation do not count), over the given modules and every logic module (`dataset`, `statistics`,
`training`) they import, found in their source; and `with_upstream_code_versions`, which folds upstream
assets' code versions into each asset's. Imports no Dagster at run time.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the trainer checks its own code version with this module and imports no Dagster
    import dagster as dg

# Shown on every asset in the UI; a team or e-mail owns the results and answers for the runs.
OWNERS = ["team:alignment-research"]


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _source(module: ModuleType | str) -> tuple[str, str]:
    """(name, source) of a module, or of a module name without importing it (the trainer imports torch)."""
    if isinstance(module, ModuleType):
        return module.__name__, inspect.getsource(module)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"no Python source for module {module!r}")
    return module, Path(spec.origin).read_text()


LOGIC_PACKAGES = ("prism_assets.dataset", "prism_assets.statistics", "prism_assets.training")


def _is_logic(name: str) -> bool:
    return any(name.startswith(package + ".") for package in LOGIC_PACKAGES)


def _imported_modules(source: str) -> set[str]:
    """Module names an import statement anywhere in the source refers to (`from p import m` → p and p.m)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def code_modules(*modules: ModuleType | str) -> list[str]:
    """The given modules, then every logic module reachable from the logic ones through imports, by name."""
    return list(_code_sources(*modules))


def _code_sources(*modules: ModuleType | str) -> dict[str, str]:
    """{name: source} of `code_modules(*modules)`, in that order; each module read once."""
    sources = dict(_source(m) for m in modules)
    given = list(sources)
    queue = [name for name in given if _is_logic(name)]
    while queue:
        for name in sorted(_imported_modules(sources[queue.pop()])):
            if _is_logic(name) and name not in sources and _module_file(name).is_file():
                sources[name] = _source(name)[1]
                queue.append(name)
    return {name: sources[name] for name in given + sorted(set(sources) - set(given))}


def _module_file(name: str) -> Path:
    """Where a module of this project lives (`from m import f` names m.f too: it is no file, and nothing is
    imported)."""
    return Path(__file__).resolve().parents[1].joinpath(*name.split(".")).with_suffix(".py")


def source_version(*modules: ModuleType | str) -> str:
    """12 hex digits of the code of `code_modules(*modules)`, blind to comments, layout and docstrings."""
    digest = hashlib.sha256()
    for name, source in _code_sources(*modules).items():
        tree = _without_docstrings(ast.parse(source))
        digest.update(name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return digest.hexdigest()[:12]


def with_upstream_code_versions(assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """The assets with code versions that also cover every upstream asset's code: `<own>+<upstream hash>`.

    Dagster marks an asset unsynced when its own code version changed or an upstream *data* version did, so
    an edit to the pair-building code alone would flag within_model_pairs and nothing below it until that
    asset is rematerialized. Folding upstream code versions in flags the whole downstream at once, which is
    what a researcher deciding what to rerun needs to see.
    """
    by_key = {asset.key: asset for asset in assets}
    versions: dict[dg.AssetKey, str] = {}

    def version(key: dg.AssetKey) -> str:
        if key not in versions:
            asset = by_key[key]
            upstream = sorted(
                version(dep.asset_key) for dep in asset.specs_by_key[key].deps if dep.asset_key in by_key
            )
            own = asset.code_versions_by_key[key] or ""
            digest = hashlib.sha256("|".join(upstream).encode()).hexdigest()[:8]
            versions[key] = f"{own}+{digest}" if upstream else own
        return versions[key]

    return [
        asset.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version(spec.key))) for asset in assets
    ]
