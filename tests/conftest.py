"""Shared fixtures: one Redis per test session (embedded, or ZDNI_TEST_REDIS_URL) and repo paths."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the `pytest` script does not put the checkout on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from zdni.redisserver import EmbeddedRedis, connect  # noqa: E402


@dataclass(frozen=True)
class ExternalRedis:
    """A Redis someone else runs, named by ZDNI_TEST_REDIS_URL (its db is the one we flush)."""

    url: str


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis | ExternalRedis]:
    """One Redis for the whole session: ZDNI_TEST_REDIS_URL if set, else an embedded server."""
    url = os.environ.get("ZDNI_TEST_REDIS_URL")
    if url:
        yield ExternalRedis(url)
        return
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis | ExternalRedis) -> str:
    """The URL of a database flushed just before this test."""
    client = connect(redis_server.url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A connected client on the freshly flushed database, closed after the test."""
    client = connect(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The root of this checkout."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def mnist_dir(repo_root: Path) -> Path:
    """The shared MNIST directory beside the checkout (or $ZDNI_TEST_MNIST, as on the GPU
    machine, where MNIST travels with the tree). Missing, the test is skipped, but where
    ZDNI_REQUIRE_MNIST is set (CI) it fails: the strongest tests must not vanish silently."""
    path = Path(os.environ.get("ZDNI_TEST_MNIST") or repo_root.parent / "shared" / "data" / "mnist")
    if not path.is_dir():
        message = f"MNIST not found at {path} (put the IDX files there to run this test)"
        if os.environ.get("ZDNI_REQUIRE_MNIST"):
            pytest.fail(message + "; ZDNI_REQUIRE_MNIST is set")
        pytest.skip(message)
    return path


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Torch computes with one thread in this process, as the workers of these tests do.

    Tiny models run fastest on one thread, and comparing with workers needs the same float
    reduction order: a Linear bias right before BatchNorm has a true gradient of exactly zero,
    and Adam turns its +-1e-9 rounding noise into +-lr steps, so two thread counts drift apart
    by whole learning-rate steps within a few iterations.
    """
    from zdni.device import one_thread as driver_threads

    with driver_threads():
        yield
