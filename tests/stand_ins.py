"""Stand-ins for what a CPU machine cannot install: vLLM and flash-attn's compiled extension.

Only for tests and the CPU demo, where nothing calls them: OpenRLHF imports both at module level.
"""

import importlib.machinery
import sys
import types
import uuid


def _module(name: str, package: bool = False) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)  # find_spec must not raise
    if package:
        module.__path__ = []
    return module


def _unavailable(*args, **kwargs):
    raise RuntimeError("vLLM is not installed on this machine (test stand-in)")


def install() -> None:
    try:
        import flash_attn_2_cuda  # noqa: F401  (a real build)
    except ImportError:
        sys.modules["flash_attn_2_cuda"] = _module("flash_attn_2_cuda")
    try:
        import vllm  # noqa: F401

        return
    except ImportError:
        pass
    vllm = _module("vllm", package=True)
    vllm.__version__ = "0.0.0+stand-in"
    vllm.SamplingParams = type("SamplingParams", (), {"__init__": lambda self, **kw: self.__dict__.update(kw)})
    vllm.LLM = vllm.AsyncEngineArgs = _unavailable
    vllm.AsyncLLMEngine = type("AsyncLLMEngine", (), {"from_engine_args": staticmethod(_unavailable)})
    submodules = {}
    for name in (
        "inputs",
        "utils",
        "distributed",
        "distributed.device_communicators",
        "distributed.device_communicators.pynccl",
        "distributed.utils",
    ):
        submodules[name] = _module(f"vllm.{name}", package=True)
    submodules["inputs"].TokensPrompt = dict
    submodules["utils"].random_uuid = lambda: uuid.uuid4().hex
    submodules["utils"].get_ip = lambda: "127.0.0.1"
    submodules["utils"].get_open_port = lambda: 0
    submodules["distributed.device_communicators.pynccl"].PyNcclCommunicator = _unavailable
    submodules["distributed.utils"].StatelessProcessGroup = _unavailable
    sys.modules["vllm"] = vllm
    for name, module in submodules.items():
        sys.modules[f"vllm.{name}"] = module
        parent, _, leaf = f"vllm.{name}".rpartition(".")
        setattr(sys.modules[parent], leaf, module)
