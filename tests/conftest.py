import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic, deadline-free property tests: kernels on 2 cores vary in time, not in answers.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
