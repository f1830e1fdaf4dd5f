import os

import pytest

# The CPU backend adapts upstream's CUDA-only calls in this process and in every process the tests start (Ray
# workers inherit it from the cluster below); the import hook applied the MEDS series at start-up already.
os.environ["MEDS_CPU_BACKEND"] = "1"
from meds_patch.integration import hook  # noqa: E402

hook.install()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray head for the whole session (2 declared GPUs, the CPU environment), stopped at the end."""
    from meds_patch.cpu.cluster import CPU_ENV, LocalRayCluster

    with LocalRayCluster(env=CPU_ENV) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def local_ray(ray_cluster):
    """The test process connected to that cluster as a Ray driver."""
    import ray

    ray.init(address=ray_cluster.gcs_address, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
