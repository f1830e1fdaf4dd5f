import pytest

from meds_patch.demo import install_stand_ins

install_stand_ins()  # vLLM and flash-attn's CUDA extension cannot be installed on CPU machines


@pytest.fixture(scope="session")
def local_ray():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
