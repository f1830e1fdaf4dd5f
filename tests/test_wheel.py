"""A regular wheel runs the demo: built from the sources, installed into a fresh environment that has the
dependencies but not the checkout, ``python -m meds_patch demo`` submits a command line whose every file comes
from the installed package.

The fresh environment is a venv whose site-packages holds the wheel (installed by pip, with its hook ``.pth``) and
a ``.pth`` that appends this environment's site-packages as a plain path, for torch, ray and openrlhf. A plain path
runs none of the ``.pth`` files there, so neither the editable install's finder nor its copy of the hook ``.pth``
is active: only the wheel can provide ``meds_patch``, and only the wheel's ``.pth`` can install the hook.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

from tests.test_hook import PATCHED, REPO, results

HOOK_PTH = "meds_patch_hook.pth"


def build_wheel(out: str) -> str:
    """The wheel of a clean copy of the sources: building in the checkout would pack whatever its ``build/lib``
    still holds from earlier builds, files the sources no longer have included."""
    source = os.path.join(out, "src")
    os.makedirs(source)
    shutil.copy(os.path.join(REPO, "setup.py"), source)
    for folder in ("meds_patch", "openrlhf"):
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(os.path.join(REPO, folder), os.path.join(source, folder), ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, source],
        check=True,
        capture_output=True,
    )
    (wheel,) = [name for name in os.listdir(out) if name.endswith(".whl")]
    return os.path.join(out, wheel)


def fresh_environment(root: str, wheel: str) -> str:
    """A venv with the wheel installed by pip and this environment's packages on a plain path; its python."""
    env = os.path.join(root, "env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True, capture_output=True)
    python = os.path.join(env, "bin", "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    here = dict.fromkeys(sysconfig.get_paths()[kind] for kind in ("purelib", "platlib"))
    with open(os.path.join(site, "_meds_test_dependencies.pth"), "w") as fh:
        fh.write("".join(f"{path}\n" for path in here))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-compile", "-q", wheel],
        check=True,
        capture_output=True,
    )
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("wheel"))
    wheel = build_wheel(os.path.join(root, "dist"))
    python = fresh_environment(root, wheel)
    cwd = os.path.join(root, "cwd")  # outside the checkout: neither its folder nor REPO is on the path
    os.makedirs(cwd)
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, env=environment
        )

    return wheel, python, run


def under(path: str, folder: str) -> bool:
    """Whether the absolute ``path`` is ``folder`` or inside it."""
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)


def in_checkout(path: str) -> bool:
    """In the checkout's sources (this environment, whose packages the fresh one borrows, may live in it too)."""
    return under(path, REPO) and not under(path, sys.prefix)


def test_the_wheel_holds_what_the_demo_submits(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert HOOK_PTH in names
    assert "meds_patch/tools/reward_func_math.py" in names
    assert {"meds_patch/cpu/demo.py", "meds_patch/cpu/cluster.py", "meds_patch/cpu/tiny_math.py"} <= set(names)
    assert sorted(n for n in names if n.endswith(".diff")) == sorted(
        f"meds_patch/series/{m.split('.', 1)[1].replace('.', '/')}.py.diff" for m in PATCHED
    )


def test_the_demo_submits_only_files_of_the_installed_package(installed, tmp_path):
    """``run_demo`` as ``python -m meds_patch demo`` runs it, with the Ray cluster and ``ray job submit`` replaced
    by stand-ins that record the command, and the tiny model by an empty folder (it lives in the user's cache)."""
    _, python, run = installed
    proc = run(f"""
        import importlib.util, inspect, json, os, subprocess, sys
        import meds_patch
        from meds_patch.cpu import demo, tiny_math
        from meds_patch.integration import hook

        commands = []

        class Job:
            def __init__(self, command, **kwargs):
                commands.append(command)
                self.stdout, self.returncode = iter(["MEDS step\\n"]), 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Cluster:
            temp_dir, address, env = "/nonexistent", "http://127.0.0.1:1", {{}}

            def __init__(self, **kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        model = os.path.join({str(tmp_path)!r}, "model")
        os.makedirs(model)
        tiny_math.prepared_model = lambda: model
        demo.LocalRayCluster, subprocess.Popen = Cluster, Job
        code = demo.run_demo(steps=1, save=os.path.join({str(tmp_path)!r}, "run"))
        spec = importlib.util.spec_from_file_location("reward_func", demo.REWARD_FUNC)  # as OpenRLHF loads it
        reward = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reward)
        print("RESULT", json.dumps({{
            "code": code, "commands": commands, "executable": sys.executable, "sys_path": sys.path,
            "meds_patch": meds_patch.__file__, "series_dir": hook.series_dir(), "series": sorted(hook.read_series()),
            "hook_active": any(isinstance(finder, hook.SeriesFinder) for finder in sys.meta_path),
            "reward_func": inspect.getfile(reward.reward_func),
            "modules": [getattr(m, "__file__", None) for n, m in sys.modules.items() if n.startswith("meds_patch")],
        }}))
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [json.loads(line) for line in results(proc)]
    package = os.path.dirname(result["meds_patch"])
    site = os.path.dirname(package)
    assert not in_checkout(package) and os.path.basename(package) == "meds_patch"
    assert os.path.isfile(os.path.join(site, HOOK_PTH)) and result["hook_active"]  # the wheel's .pth ran
    assert not [path for path in result["sys_path"] if path and in_checkout(path)]
    assert result["modules"] and all(path and under(path, package) for path in result["modules"])
    assert result["series_dir"] == os.path.join(package, "series") and result["series"] == PATCHED

    assert result["code"] == 0
    (command,) = result["commands"]
    assert command[:3] == [os.path.join(os.path.dirname(python), "ray"), "job", "submit"]
    entry = command.index("--")
    assert command[entry + 1 :][:3] == [result["executable"], "-m", "openrlhf.cli.train_ppo_ray"]
    assert result["executable"] == python
    args = command[entry + 4 :]
    flags = {flag: value for flag, value in zip(args, args[1:] + [None]) if flag.startswith("--")}
    assert "--meds" in flags
    reward = flags["--reward.remote_url"]
    assert reward == os.path.join(package, "tools", "reward_func_math.py") and os.path.isfile(reward)
    assert result["reward_func"] == reward  # the function's body is in that file, not imported from elsewhere
    assert os.path.isfile(flags["--data.prompt_dataset"]) and under(flags["--data.prompt_dataset"], tmp_path)
    assert flags["--actor.model_name_or_path"] == str(tmp_path / "model")
    # Nothing else it hands over is a path of the checkout or of the package.
    paths = [value for value in args if os.path.isabs(value)]
    assert not [path for path in paths if in_checkout(path) or (under(path, package) and path != reward)]


def test_the_installed_entry_point_is_patched_by_the_installed_hook(installed):
    """What the job runs, ``python -m openrlhf.cli.train_ppo_ray``, in the fresh environment: the wheel's hook
    patches it (its --help lists --meds) and every MEDS module it loads comes from the installed package."""
    _, _, run = installed
    proc = run("""
        import json, runpy, sys
        sys.argv = ["train_ppo_ray", "--help"]
        try:
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
        except SystemExit:
            pass
        files = [getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.startswith("meds_patch")]
        print("RESULT", json.dumps({"meds_patch": sys.modules["meds_patch"].__file__, "files": files}))
        """)
    assert "--meds" in proc.stdout and "--algo.meds.alpha" in proc.stdout, proc.stderr[-3000:]
    (result,) = [json.loads(line) for line in results(proc)]
    package = os.path.dirname(result["meds_patch"])
    assert not in_checkout(package)
    assert result["files"] and all(path and under(path, package) for path in result["files"])
