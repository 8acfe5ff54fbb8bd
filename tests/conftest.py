import os
import random
import zlib

import pytest
import torch

# Fresh random inputs on every run; PYOPS_TEST_SEED=<n> replays one.
SEED = int(os.environ.get("PYOPS_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"pyops test seed: {SEED} (replay with PYOPS_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + (zlib.crc32(request.node.nodeid.encode()) % 100_000))
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (minutes: e.g. a Flower simulation on Ray) run only with PYOPS_SLOW_TESTS=1."""
    if os.environ.get("PYOPS_SLOW_TESTS"):
        return
    skip = pytest.mark.skip(reason="slow: run with PYOPS_SLOW_TESTS=1 (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
