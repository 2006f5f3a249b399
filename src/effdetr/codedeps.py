"""Which source files a stage's command runs: the static closure of module-level imports
from the modules its configuration selects (no torch import: Snakemake parses this).

Imports inside functions are not followed on purpose: the model code imports what a
configuration switches on (Lite DETR's encoder, Sparse DETR's scorer, ACT's kernels) where it
is switched on, and the stage table names those modules per experiment (``model_modules``).
So editing ``models/lite_detr.py`` reruns the Lite DETR experiments and nothing of DETR.
``tests/test_code_deps.py`` checks the declared files against what building each model,
criterion and distiller really imports.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = "effdetr"


def _root() -> Path:
    return Path(__file__).resolve().parent


def module_file(module: str, root: Path | None = None) -> Path | None:
    """``effdetr.models.detr`` -> .../models/detr.py (a package: its __init__.py)."""
    root = root or _root()
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    return None


@lru_cache(maxsize=None)
def _imports(path: Path, module: str) -> tuple[str, ...]:
    """The effdetr modules ``module`` imports at its top level."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    pkg = module if is_pkg else module.rsplit(".", 1)[0]
    out = []
    for node in tree.body:  # top-level statements only: not function bodies
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            out.append(target)
            out += [f"{target}.{a.name}" for a in node.names]  # `from . import x`: x may be a module
    return tuple(out)


def closure(modules: list[str], root: Path | None = None) -> list[str]:
    """The files of ``modules`` and of everything they import at top level, transitively
    (a package's __init__ comes with every module inside it)."""
    root = root or _root()
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        f = module_file(m, root)
        if f is None:
            continue
        seen[m] = f
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages, the root one too
        todo += list(_imports(f, m))
    return sorted({str(f.relative_to(root.parent.parent)) for f in seen.values()})


def model_modules(model) -> list[str]:
    """The modules a model configuration (config.ModelConfig) switches on: its architecture's,
    and each feature's where the model code imports it (Lite DETR's encoder, KDA, Sparse
    DETR's scorer and saliency loss, ACT's kernels)."""
    if model.arch == "detr":
        mods = ["effdetr.models.detr", "effdetr.models.criterion"]
        if model.encoder_attention in ("act", "kmeans"):
            mods.append("effdetr.ops.act")
        return mods
    mods = ["effdetr.models.deformable", "effdetr.models.criterion", "effdetr.models.focal_criterion"]
    if model.lite.high_levels is not None:
        mods.append("effdetr.models.lite_detr")
    if model.lite.key_aware:
        mods.append("effdetr.ops.kda")
    if model.sparse.rho is not None:
        mods.append("effdetr.models.sparse_detr")
    return mods


DISTILL_MODULES = {"mtkd": "effdetr.distill.mtkd", "detrdistill": "effdetr.distill.detrdistill_loss"}


def distill_modules(method: str) -> list[str]:
    """The distillation package and the module of ``method`` (imported where it is built)."""
    return ["effdetr.distill", DISTILL_MODULES[method]]
