import pytest

from tests.launch.slurm_cluster import ClusterUnavailable, cluster_env


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """A running one-node SLURM cluster (started here if needed); skips with the reason where it cannot run."""
    try:
        return cluster_env()
    except ClusterUnavailable as exc:
        pytest.skip(f"SLURM unavailable: {exc}")
