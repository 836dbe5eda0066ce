"""The package layout: imports point down (hf -> inllm -> compressors/registry/types), shims still resolve and warn.

Imports are read with `ast` (every `import` / `from ... import` in a module, at its top or inside a function), so a
lazy upward import is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mmcompress"

# package (folder under mmcompress/) -> the mmcompress modules it must never import
FORBIDDEN = {
    "compressors": ("mmcompress.hf", "mmcompress.inllm", "mmcompress.vllm_plugin", "mmcompress.lmms_eval_plugin",
                    "mmcompress.integrations"),
    "inllm": ("mmcompress.hf", "mmcompress.vllm_plugin", "mmcompress.lmms_eval_plugin", "mmcompress.integrations"),
    "hf": ("mmcompress.vllm_plugin", "mmcompress.lmms_eval_plugin", "mmcompress.integrations"),
}
# the public entry points of the HF adapter, reached through `import mmcompress as mmc`
MMC_HF_NAMES = {"apply", "remove", "disabled", "stats", "hf", "integrations"}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name `path` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from mmcompress import hf`
    return found


def mmc_attributes(path: Path) -> set[str]:
    """Attributes read off a name bound by `import mmcompress as <name>` (e.g. `mmc.apply`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
               if a.name == "mmcompress"}
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in aliases}


def upward_imports(package: str) -> list[str]:
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        for mod in imported_modules(path):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
        for attr in mmc_attributes(path) & MMC_HF_NAMES:
            if package != "hf":
                bad.append(f"{path.relative_to(ROOT)} uses mmcompress.{attr}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_upward(package):
    assert upward_imports(package) == []


def test_the_import_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: a function-level import, a relative one and `mmc.apply` all count."""
    pkg = tmp_path / "mmcompress" / "inllm"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text('"""x."""\n\ndef f():\n    from ..hf import placeholder\n    import mmcompress as m\n'
                                '    return m.apply, placeholder\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "mmcompress")
    bad = upward_imports("inllm")
    assert any("imports mmcompress.hf" in b for b in bad) and any("mmcompress.apply" in b for b in bad), bad


def test_nothing_in_the_library_imports_the_deprecated_shims():
    """The package and what ships in it (evals/, kernels/, demos/ as mmcompress.*), scripts and benchmarks."""
    files = [p for d in ("mmcompress", "evals", "kernels", "demos", "scripts", "benchmarks") for p in
             sorted((ROOT / d).rglob("*.py")) if "integrations" not in p.relative_to(ROOT).parts]
    users = [str(p.relative_to(ROOT)) for p in files
             if any(m == "mmcompress.integrations" or m.startswith("mmcompress.integrations.")
                    for m in imported_modules(p))]
    assert users == []


def test_every_module_of_the_split_states_its_role():
    files = [p for d in ("hf", "inllm", "vllm_plugin", "integrations") for p in sorted((PKG / d).rglob("*.py"))]
    missing = [str(p.relative_to(ROOT)) for p in files + [PKG / "lmms_eval_plugin.py"]
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert missing == []


def test_in_llm_methods_live_in_the_inllm_package():
    from mmcompress.catalog import IN_LLM

    for name, (module, *_rest) in IN_LLM.items():
        assert importlib.util.find_spec(f"mmcompress.inllm.{module}") is not None, name


SHIM_CHECK = r"""
import json, sys, warnings
warnings.simplefilter("always")
out = {}
with warnings.catch_warnings(record=True) as w:
    import mmcompress.integrations.vllm_plugin as old_vp
    import mmcompress.vllm_plugin as vp
    out["vllm"] = [old_vp.register is vp.register, "torch" in sys.modules, "vllm" in sys.modules,
                   [str(x.message) for x in w if x.category is DeprecationWarning]]
with warnings.catch_warnings(record=True) as w:
    from mmcompress.integrations import apply, disabled, remove, stats
    import mmcompress as mmc
    out["hf"] = [(apply, remove, disabled, stats) == (mmc.apply, mmc.remove, mmc.disabled, mmc.stats),
                 [str(x.message) for x in w if x.category is DeprecationWarning]]
with warnings.catch_warnings(record=True) as w:
    from mmcompress.integrations.fastv import FastV
    import mmcompress.inllm
    out["fastv"] = [FastV is mmcompress.inllm.FastV, [str(x.message) for x in w if x.category is DeprecationWarning]]
with warnings.catch_warnings(record=True) as w:
    import mmcompress.integrations.lmms_eval
    out["lmms"] = [True, [str(x.message) for x in w if x.category is DeprecationWarning]]
print(json.dumps(out))
"""


def test_deprecated_paths_resolve_to_the_new_objects_and_warn():
    r = subprocess.run([sys.executable, "-c", SHIM_CHECK], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    same, torch_loaded, vllm_loaded, msgs = out["vllm"]
    assert same and not torch_loaded and not vllm_loaded  # the plugin shim stays as light as the plugin
    assert any("mmcompress.vllm_plugin" in m for m in msgs), msgs
    same, msgs = out["hf"]
    assert same and {f"mmcompress.hf.{n}" for n in ("apply", "remove", "disabled", "stats")} <= {
        m.rsplit(" ", 1)[-1] for m in msgs}, msgs
    same, msgs = out["fastv"]
    assert same and any("mmcompress.inllm.fastv" in m for m in msgs), msgs
    _, msgs = out["lmms"]
    assert any("mmcompress.lmms_eval_plugin" in m for m in msgs), msgs


def _runtime_imports(path: Path) -> set[str]:
    """Absolute module names `path` imports, minus those under `if TYPE_CHECKING:` (annotations only, never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_no_import_circle_inside_compressors():
    """base.py's keep="auto" needs `estimate_keep`; it lives in budget.py, below both base.py and adaptive.py."""
    mods = {f"mmcompress.compressors.{p.stem}": p for p in (PKG / "compressors").glob("*.py") if p.stem != "__init__"}
    graph = {m: {d for d in _runtime_imports(p) if d in mods} for m, p in mods.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    circles = sorted(m for m in graph if m in reach(m))
    assert circles == []
    assert "mmcompress.compressors.budget" in graph["mmcompress.compressors.base"]
