"""Shared test setup: every backend-parametrized test runs on every (device, backend) pair that
fusedloss.available_backends reports, so a new backend is tested by being registered.

Without a GPU, Triton kernels run under its interpreter: triton reads TRITON_INTERPRET when a
kernel is decorated (at import of fusedloss.triton_kernels), so it is set here, before fusedloss
is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

import fusedloss  # noqa: E402

settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.differing_executors])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def device_backends():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(d, b) for d in devices for b in fusedloss.available_backends(d)]


DEVICE_BACKENDS = device_backends()


def pytest_generate_tests(metafunc):
    if "dev_backend" in metafunc.fixturenames:
        metafunc.parametrize("dev_backend", DEVICE_BACKENDS,
                             ids=[f"{d}-{b}" for d, b in DEVICE_BACKENDS])


def is_slow_backend(device: str, backend: str) -> bool:
    """The Triton interpreter runs kernels in numpy: ~1 s for 64x1000. Budget it."""
    return device == "cpu" and backend == "triton"


def example_budget(device: str, backend: str, fast: int) -> int:
    return max(4, fast // 6) if is_slow_backend(device, backend) else fast


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
