"""The import hook: applies the insertion-only patch series (``openrlhf/**/*.py.diff``) to upstream modules in memory.

A ``.pth`` file calls ``install()`` in every Python process of the environment. This module imports nothing
heavy: no torch, numpy or openrlhf. Set ``MEDS_PATCH_DISABLE=1`` to switch it off.
"""

import hashlib
import importlib.machinery
import linecache
import os
import re
import sys
import traceback
from typing import Dict, List, NamedTuple, Optional, Tuple

SUPPORTED = "openrlhf==0.11.2"
DISABLE_ENV = "MEDS_PATCH_DISABLE"
HUNK = re.compile(r"^@@ -(\d+),0 \+(\d+)(?:,(\d+))? @@")


class Patch(NamedTuple):
    path: str  # upstream file, relative to site-packages, e.g. "openrlhf/models/actor.py"
    sha256: str  # of the pristine upstream file
    hunks: List[Tuple[int, List[str]]]  # (insert after this 1-based upstream line, inserted lines)


def series_dir() -> str:
    """The patch series: shipped inside the package by a wheel, or the repository's top-level ``openrlhf/``."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped = os.path.join(package, "series")
    return shipped if os.path.isdir(shipped) else os.path.join(os.path.dirname(package), "openrlhf")


def parse_patch(text: str, name: str) -> Patch:
    """Parse one ``.diff`` of the series; anything but a pure insertion is an error."""
    sha = path = None
    hunks: List[Tuple[int, List[str]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{number}"
        if line.startswith("# sha256 "):
            sha = line.split()[2]
        elif line.startswith("+++ b/"):
            path = line[len("+++ b/") :]
        elif line.startswith("@@"):
            match = HUNK.match(line)
            if not match:
                raise ValueError(f"{where}: hunk header must insert only ('@@ -N,0 +M,K @@'): {line!r}")
            hunks.append((int(match.group(1)), []))
        elif line.startswith("+") and hunks:
            hunks[-1][1].append(line[1:])
        elif hunks:
            raise ValueError(f"{where}: the series must be insertion-only, found {line!r}")
    if not (sha and path and hunks):
        raise ValueError(f"{name}: needs a '# sha256 <hex>' line, a '+++ b/<path>' line and at least one hunk")
    return Patch(path, sha, hunks)


def read_series() -> Dict[str, Patch]:
    """Module name -> its patch, for every ``.diff`` in the series."""
    root, series = series_dir(), {}
    for folder, _, files in os.walk(root):
        for file in sorted(f for f in files if f.endswith(".py.diff")):
            with open(os.path.join(folder, file), encoding="utf-8") as fh:
                patch = parse_patch(fh.read(), file)
            series[patch.path[: -len(".py")].replace("/", ".")] = patch
    return series


def apply_patch(source: str, patch: Patch) -> str:
    """Insert the hunks' lines into the upstream source."""
    lines = source.splitlines(keepends=True)
    for after, added in sorted(patch.hunks, reverse=True):
        if after > len(lines):
            raise ValueError(f"{patch.path}: a hunk inserts after line {after}, the file has {len(lines)}")
        lines[after:after] = [line + "\n" for line in added]
    return "".join(lines)


def sha256_of(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def upstream_root() -> Optional[str]:
    """The directory that holds the installed ``openrlhf`` package, without importing it."""
    spec = importlib.machinery.PathFinder.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(list(spec.submodule_search_locations)[0])


class PatchedLoader(importlib.machinery.SourceFileLoader):
    """Loads an upstream file with the series' lines inserted; never reads or writes cached bytecode."""

    def __init__(self, fullname: str, path: str, source: str):
        super().__init__(fullname, path)
        self.source = source

    def get_source(self, fullname):
        return self.source

    def get_code(self, fullname):
        # The traceback module, pdb and inspect read lines through linecache: give them the patched text
        # (mtime None keeps checkcache from dropping it). Python 3.11's built-in excepthook reads the file from
        # disk instead, so route it through the traceback module, which prints the same report with true lines.
        linecache.cache[self.path] = (len(self.source), None, self.source.splitlines(keepends=True), self.path)
        if sys.excepthook is sys.__excepthook__:
            sys.excepthook = lambda *exc: traceback.print_exception(*exc)
        return compile(self.source, self.path, "exec", dont_inherit=True)


class SeriesFinder:
    """A ``sys.meta_path`` finder that answers only for the patched module names."""

    def __init__(self):
        self.series: Optional[Dict[str, Patch]] = None
        self.usable: Optional[bool] = None

    def _check_pins(self) -> bool:
        # All or nothing: a half-patched upstream would be worse than an unpatched one.
        root = upstream_root()
        for patch in self.series.values():
            path = os.path.join(root or "", patch.path)
            if root is None or not os.path.isfile(path) or sha256_of(path) != patch.sha256:
                sys.stderr.write(
                    f"meds_patch: the installed {patch.path} is not the one from {SUPPORTED}; OpenRLHF runs "
                    f"unpatched and --meds is unavailable. Install {SUPPORTED} to use MEDS.\n"
                )
                return False
        return True

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("openrlhf."):
            return None
        if self.series is None:
            self.series = read_series()
        patch = self.series.get(fullname)
        if patch is None:
            return None
        if self.usable is None:
            self.usable = self._check_pins()
        if not self.usable:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return None
        with open(spec.origin, encoding="utf-8") as fh:
            source = apply_patch(fh.read(), patch)
        spec.loader = PatchedLoader(fullname, spec.origin, source)
        spec.cached = None
        return spec

    def invalidate_caches(self):
        pass


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent; a no-op when ``MEDS_PATCH_DISABLE=1``), and the CPU
    backend's before it when ``MEDS_CPU_BACKEND=1`` (see ``cpu_backend``; not part of the MEDS series)."""
    if os.environ.get(DISABLE_ENV, "") in ("", "0") and not any(isinstance(f, SeriesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SeriesFinder())
    if os.environ.get("MEDS_CPU_BACKEND") == "1":
        from meds_patch.cpu import backend as cpu_backend

        cpu_backend.install()


def is_active() -> bool:
    """Whether upstream modules loaded in this process carry the series."""
    return any(isinstance(getattr(m, "__loader__", None), PatchedLoader) for m in list(sys.modules.values()))
