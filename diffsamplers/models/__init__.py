"""Testbeds: the exact Gaussian mixture and its reference ODE solutions."""

from .exact import exact_solution
from .gmm import GaussianMixtureModel

__all__ = ["GaussianMixtureModel", "exact_solution"]
