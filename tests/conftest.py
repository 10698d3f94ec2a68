"""Shared test fixtures."""

import pytest
import torch

from diffsamplers.eval.testbed import TESTBED_CONFIG
from diffsamplers.models import GaussianMixtureModel


@pytest.fixture
def one_thread():
    """Tiny models and matrices run faster on one thread than on two contended ones (thread hand-offs cost more
    than the maths); the previous thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    """The exact digits testbed (Gaussian mixture) on the testbed's VP config (a test file may define its own)."""
    return GaussianMixtureModel.digits(scheduler_config=TESTBED_CONFIG)


@pytest.fixture(scope="module")
def x_T():
    """Three fixed float64 starts for the digits testbed."""
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="session")
def fit_model():
    """The six-component mixture as a FitModel with exact references: what the fitted-solver tests fit to."""
    from diffsamplers.testing import small_fit_model

    return small_fit_model()


@pytest.fixture(scope="session")
def dit():
    """The bundled class-conditional latent DiTPipeline (loaded once per test session)."""
    from diffsamplers.models.digits_latent import load_digits_latent_pipeline

    return load_digits_latent_pipeline()

