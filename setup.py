import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HOOK_PTH = "meds_patch_hook.pth"


class build_py_with_hook(build_py):
    """Ship the import hook's .pth at the root of site-packages and the patch series inside the package."""

    def run(self):
        super().run()
        shutil.copy(os.path.join("meds_patch", "integration", HOOK_PTH), os.path.join(self.build_lib, HOOK_PTH))
        for diff in glob.glob("openrlhf/**/*.diff", recursive=True):
            target = os.path.join(self.build_lib, "meds_patch", "series", os.path.relpath(diff, "openrlhf"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(diff, target)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, HOOK_PTH)]


setup(
    name="openrlhf-meds",
    version="0.1.0",
    description="MEDS (memory-enhanced dynamic reward shaping) for OpenRLHF, as an insertion-only patch series",
    packages=find_packages(include=["meds_patch", "meds_patch.*"]),
    package_data={"meds_patch.integration": [HOOK_PTH]},
    python_requires=">=3.10",
    install_requires=[
        "openrlhf==0.11.2",
        "hdbscan>=0.8.33",
        "scikit-learn>=1.3",
        "numpy",
        "torch",
        "math-verify>=0.7",
        "pebble>=5.0",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "py-spy"],  # py-spy: bench/step_overhead.py samples the run with it
        "vllm": ["openrlhf[vllm]==0.11.2"],
    },
    cmdclass={"build_py": build_py_with_hook},
)
