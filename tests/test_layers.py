"""The package's layers, read from its modules' import statements (docs/ARCHITECTURE.md)."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "meds_patch"
CORE_MAY_IMPORT = {"numpy", "torch", "sklearn", "scipy", "hdbscan"}  # scipy: scikit-learn's own dependency


def imported(path: Path) -> set:
    """Every module a file imports, at its top or inside a function, as the absolute dotted name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module)
    return names


def layer_imports(layer: str) -> dict:
    return {path.relative_to(PACKAGE).as_posix(): imported(path) for path in sorted((PACKAGE / layer).glob("*.py"))}


def test_the_core_imports_only_numpy_torch_sklearn_scipy_hdbscan_and_itself():
    outside = {
        file: sorted(
            name
            for name in names
            if name.split(".")[0] not in CORE_MAY_IMPORT | set(sys.stdlib_module_names)
            and not name.startswith("meds_patch.core")
        )
        for file, names in layer_imports("core").items()
    }
    assert len(outside) >= 6 and not any(outside.values()), outside


def test_the_core_never_imports_a_framework():
    frameworks = {"openrlhf", "ray", "deepspeed", "vllm", "transformers"}
    found = {
        f: sorted(n for n in names if n.split(".")[0] in frameworks) for f, names in layer_imports("core").items()
    }
    assert not any(found.values()), found


def test_the_tools_do_not_reach_into_the_integration():
    found = {
        f: sorted(n for n in names if n.startswith("meds_patch.integration"))
        for f, names in layer_imports("tools").items()
    }
    assert not any(found.values()), found
