"""The CPU backend: upstream's CUDA-only calls adapted after import, only when asked for and never beside CUDA."""

import threading

import torch

from meds_patch.cpu.cluster import free_ports
from tests.test_hook import python, results

PROBE = """
    import torch
    {before}
    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer
    print("RESULT", torch.cuda.current_device.__module__)
    print("RESULT", NaiveReplayBuffer(sample_batch_size=1).target_device)
    print("RESULT", ppo_actor.stateless_init_process_group.__module__)
"""


def test_upstream_is_adapted_after_its_modules_ran():
    result = python(PROBE.format(before=""), env={"MEDS_CPU_BACKEND": "1"})
    assert results(result) == ["meds_patch.cpu.backend", "cpu", "meds_patch.cpu.backend"], result.stderr[-3000:]


def test_nothing_is_adapted_where_cuda_is_available():
    # torch.cuda is left alone, so upstream builds its cuda:N replay-buffer device as on a GPU machine.
    # (bitsandbytes, deepspeed and flash-attn's compiled extension need a real CUDA: they load while the CPU
    # torch still tells the truth.)
    before = (
        "import bitsandbytes, deepspeed, flash_attn; "
        "torch.cuda.is_available = lambda: True; torch.cuda.current_device = lambda: 0"
    )
    result = python(PROBE.format(before=before), env={"MEDS_CPU_BACKEND": "1"})
    assert results(result) == ["__main__", "cuda:0", "openrlhf.utils.distributed_util"], result.stderr[-3000:]
    assert "MEDS_CPU_BACKEND=1 is ignored: CUDA is available" in result.stderr


def test_the_backend_is_off_without_its_environment_variable():
    result = python(
        """
        import sys
        from meds_patch.cpu.backend import CPUBackendFinder
        print("RESULT", any(isinstance(f, CPUBackendFinder) for f in sys.meta_path))
        try:
            import openrlhf.models
        except ImportError as err:
            print("RESULT", err.name)
        """,
        env={"MEDS_CPU_BACKEND": ""},
    )
    assert results(result) == ["False", "flash_attn_2_cuda"], result.stderr[-3000:]


def test_weight_sync_group_broadcasts_rank_0s_tensor_over_gloo():
    from openrlhf.utils.distributed_util import stateless_init_process_group

    (port,), received = free_ports(1), {}

    def rank(r):
        group = stateless_init_process_group("127.0.0.1", port, r, 2, "cpu")
        tensor = torch.arange(6.0).reshape(2, 3) if r == 0 else torch.empty(2, 3)
        group.broadcast(tensor, src=0, stream=None)
        received[r] = tensor

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    torch.testing.assert_close(received[1], torch.arange(6.0).reshape(2, 3))


ZERO3_GATHER = """
    import threading, time, types
    import torch
    import deepspeed.comm as comm
    from deepspeed.runtime.zero.partition_parameters import Init

    # A gloo-like all-gather over two ranks: an async one lands on a thread of its own, the earlier ones last.
    # The other rank's partition is this rank's + 100.
    delays = [0.6, 0.3, 0.0]

    def all_gather_into_tensor(output, tensor, group=None, async_op=False, **kwargs):
        land = lambda delay: (time.sleep(delay), output.copy_(torch.cat([tensor, tensor + 100])))
        if not async_op:
            land(0)
            return None
        thread = threading.Thread(target=land, args=(delays.pop(0),))
        thread.start()
        return types.SimpleNamespace(wait=thread.join)

    comm.all_gather_into_tensor = all_gather_into_tensor
    params = []
    for i in range(3):
        param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        param.ds_tensor = torch.arange(2.0) + 10 * i
        param.ds_tensor.ds_numel, param.ds_numel, param.ds_shape = 2, 4, (4,)
        params.append(param)
    partitioner = types.SimpleNamespace(
        _partition_world_size=lambda p: 2, get_partition_dp_group=lambda p: None,
        use_all_gather_into_tensor=True, local_device=torch.device("cpu"),
    )
    Init._allgather_params_coalesced(partitioner, params)
    for i, param in enumerate(params):  # read at once, as the module's forward would
        print("RESULT", param.data.tolist() == [10.0 * i, 10.0 * i + 1, 10.0 * i + 100, 10.0 * i + 101])
"""


def test_zero3_gathers_a_parameter_list_completely_before_it_is_used():
    result = python(ZERO3_GATHER, env={"MEDS_CPU_BACKEND": "1"})
    assert results(result) == ["True", "True", "True"], result.stderr[-3000:]


def test_unadapted_zero3_uses_parameters_whose_gather_has_not_landed():
    # What the adaptation is for: DeepSpeed 0.19.6 waits for the last gather only.
    result = python(ZERO3_GATHER, env={"MEDS_CPU_BACKEND": ""})
    assert results(result) == ["False", "False", "True"], result.stderr[-3000:]
