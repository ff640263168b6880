"""Shared fixtures: the real CIFAR-10 shards beside the project, and one small local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_DIR = Path(os.environ.get("CE_CIFAR10_DIR", REPO.parent / "shared" / "datasets" / "cifar10"))


# What puts a test in the integration tier: a real Ray, the CIFAR-10 shards beside the project,
# or the slow end-to-end marks. Everything else (tiny tensors, shards a test writes itself, a
# sqlite MLflow store in tmp) is the fast unit tier: `pytest -m "not integration"`.
INTEGRATION_FIXTURES = {"ray_local", "cifar_dir", "cifar_train", "cifar_test", "cifar_small"}
INTEGRATION_MARKS = {"slow", "cifar", "integration"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the integration tier from what each test uses, so no test can forget its tier."""
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        marks = {m.name for m in item.iter_markers()}
        if uses & INTEGRATION_FIXTURES or marks & INTEGRATION_MARKS:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """../shared/datasets/cifar10. Under CI=true a missing folder fails the test, never skips."""
    if not (CIFAR_DIR / "cifar10-train-000000.tar").is_file():
        msg = f"CIFAR-10 shards not found at {CIFAR_DIR} (set CE_CIFAR10_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return CIFAR_DIR


@pytest.fixture(scope="session")
def cifar_train(cifar_dir: Path) -> str:
    return str(cifar_dir / "cifar10-train-{000000..000009}.tar")


@pytest.fixture(scope="session")
def cifar_test(cifar_dir: Path) -> str:
    return str(cifar_dir / "cifar10-test-{000000..000001}.tar")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine OpenMP barriers
    under contention make a 10 ms step take seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs, like the machine), shut down at the end."""
    import ray

    from pipeline.runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(2, log_to_driver=False)
    yield ray
    ray.shutdown()
