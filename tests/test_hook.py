"""The import hook and the patch series: applied in every process, insertion-only, pinned, reviewable."""

import os
import subprocess
import sys
import textwrap

import pytest

from meds_patch.integration import hook

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHED = [
    "openrlhf.cli.train_ppo_ray",
    "openrlhf.trainer.ppo_trainer",
    "openrlhf.trainer.ppo_trainer_async",
    "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ray.ppo_actor",
]


def python(code: str, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter of this environment (the .pth hook runs at its start-up)."""
    environment = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, cwd=cwd
    )


def results(proc: subprocess.CompletedProcess) -> list:
    """What the child printed with print("RESULT", ...): libraries write their own noise to stdout."""
    return [line[len("RESULT ") :] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def test_series_patches_exactly_the_pinned_upstream_files():
    series = hook.read_series()
    assert sorted(series) == PATCHED
    root = hook.upstream_root()
    for patch in series.values():
        assert hook.sha256_of(os.path.join(root, patch.path)) == patch.sha256


def test_series_is_insertion_only_and_small():
    inserted = 0
    for folder, _, files in os.walk(os.path.join(REPO, "openrlhf")):
        for name in files:
            assert name.endswith(".py.diff"), f"only .py.diff files belong in openrlhf/: {name}"
            with open(os.path.join(folder, name)) as fh:
                lines = fh.read().splitlines()
            assert not [line for line in lines if line.startswith("-") and not line.startswith("--- a/")]
            inserted += sum(1 for line in lines if line.startswith("+") and not line.startswith("+++ b/"))
    assert 0 < inserted <= 100


def test_a_hunk_that_removes_a_line_is_rejected():
    text = "# sha256 00\n--- a/openrlhf/x.py\n+++ b/openrlhf/x.py\n@@ -3,1 +3,1 @@\n-old\n+new\n"
    with pytest.raises(ValueError, match="insert only"):
        hook.parse_patch(text, "x.py.diff")


def test_hunks_insert_after_the_named_line():
    patch = hook.parse_patch("# sha256 00\n+++ b/openrlhf/x.py\n@@ -1,0 +2,1 @@\n+b\n@@ -2,0 +4,2 @@\n+d\n+e\n", "x")
    assert hook.apply_patch("a\nc\nf\n", patch) == "a\nb\nc\nd\ne\nf\n"


def test_startup_hook_imports_nothing_heavy():
    result = python("""
        import sys
        from meds_patch.integration.hook import SeriesFinder
        print("RESULT", any(isinstance(f, SeriesFinder) for f in sys.meta_path))
        print("RESULT", sorted(m for m in ("torch", "numpy", "openrlhf", "hdbscan") if m in sys.modules))
        """)
    assert results(result) == ["True", "[]"], result.stderr


PATCHED_IMPORT = """
    import inspect
    import openrlhf.trainer.ppo_utils.experience_maker as m
    from meds_patch.integration.hook import PatchedLoader
    print("RESULT", isinstance(m.__loader__, PatchedLoader))
    print("RESULT", "meds.shape_rewards(self, experiences)" in inspect.getsource(m.RemoteExperienceMaker))
"""


def test_hook_patches_upstream_in_a_fresh_interpreter():
    result = python(PATCHED_IMPORT)
    assert results(result) == ["True", "True"], result.stderr


def test_environment_variable_switches_the_hook_off():
    result = python(PATCHED_IMPORT, env={"MEDS_PATCH_DISABLE": "1"})
    assert results(result) == ["False", "False"], result.stderr


def test_tracebacks_show_the_patched_lines():
    result = python("""
        import traceback
        from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
        maker = RemoteExperienceMaker.__new__(RemoteExperienceMaker)
        maker.strategy = None  # compute_advantages_and_returns fails on its first line
        try:
            maker.compute_advantages_and_returns([])
        except AttributeError as err:
            frame = traceback.extract_tb(err.__traceback__)[-1]
            print("RESULT", frame.lineno, frame.line)
        maker.compute_advantages_and_returns([])  # uncaught: the interpreter's own report
        """)
    source = open(os.path.join(hook.upstream_root(), "openrlhf/trainer/ppo_utils/experience_maker.py")).read()
    upstream_line = source.splitlines().index("        args = self.strategy.args", 230) + 1
    patched_line = upstream_line + 3  # the series inserts 3 lines above compute_advantages_and_returns
    assert results(result) == [f"{patched_line} args = self.strategy.args"], result.stderr
    assert f"line {patched_line}, in compute_advantages_and_returns\n    args = self.strategy.args" in result.stderr


def test_mismatched_upstream_is_left_unpatched_with_one_clear_line():
    result = python("""
        import sys
        from meds_patch.integration import hook
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, hook.SeriesFinder)]
        finder = hook.SeriesFinder()
        finder.series = {n: p._replace(sha256="0" * 64) for n, p in hook.read_series().items()}
        sys.meta_path.insert(0, finder)
        import openrlhf.trainer.ppo_trainer, openrlhf.trainer.ray.ppo_actor
        print("RESULT", hook.is_active())
        """)
    assert results(result) == ["False"], result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("meds_patch:")]
    assert len(lines) == 1 and "openrlhf==0.11.2" in lines[0] and "unpatched" in lines[0]


def test_hook_applies_inside_a_ray_actor(local_ray):
    @local_ray.remote
    class Probe:
        def patched(self):
            import openrlhf.trainer.ray.ppo_actor as m

            from meds_patch.integration.hook import PatchedLoader

            return isinstance(m.__loader__, PatchedLoader), hasattr(m, "meds")

    assert local_ray.get(Probe.remote().patched.remote()) == (True, True)


def test_diff_command_prints_the_full_context_series():
    result = subprocess.run([sys.executable, "-m", "meds_patch", "diff"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert [line for line in out if line.startswith("+++ ")] == [f"+++ b/{m.replace('.', '/')}.py" for m in PATCHED]
    added = [line for line in out if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in out if line.startswith("-") and not line.startswith("---")]
    assert removed == [] and len(added) == sum(len(l) for p in hook.read_series().values() for _, l in p.hunks)
    assert "def train(args):" in result.stdout  # full context, not just the hunks


def test_cli_help_lists_every_meds_flag():
    result = python("""
        import runpy, sys
        sys.argv = ["train_ppo_ray", "--help"]
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
        """)
    from meds_patch import MEDSConfig

    flags = (
        ["--meds"]
        + [f"--algo.meds.{name}" for name in MEDSConfig.field_names()]
        + ["--algo.meds.anchor", "--algo.meds.anchor_search"]
    )
    assert all(flag in result.stdout for flag in flags), result.stderr[-2000:]


def test_wheel_ships_the_hook_and_the_series(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), REPO],
        check=True,
        capture_output=True,
    )
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "meds_patch_hook.pth" in names
    assert sorted(n for n in names if n.endswith(".diff")) == sorted(
        f"meds_patch/series/{m.split('.', 1)[1].replace('.', '/')}.py.diff" for m in PATCHED
    )


def test_upstream_test_suite_passes_under_the_hook(tmp_path):
    tests_dir = os.path.join(hook.upstream_root(), "tests")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests_dir],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and "failed" not in summary, result.stdout[-3000:]
    assert int(summary.split()[0]) >= 221
