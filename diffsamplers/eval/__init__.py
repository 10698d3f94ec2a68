"""Evaluation: full-step ground truth, features and FID, per-pair metrics, the exact-testbed errors, the bench."""

from .features import (
    InceptionFeatureExtractor,
    clean_resize,
    extract_features,
    find_inception_weights,
    load_inception,
    quantize_images,
)
from .fid import StreamingStats, fid_from_features, fid_from_stats, frechet_distance
from .ground_truth import (
    config_hash,
    generate_ground_truth,
    iter_ground_truth,
    load_ground_truth,
    pipeline_manifest,
    pipeline_sample_fn,
)
from .metrics import lpips, lpips_available, psnr, rmse, ssim
from .testbed import SamplerSpec, diffusers_baselines, exact_testbed_errors, loglog_slope

__all__ = [
    "InceptionFeatureExtractor",
    "SamplerSpec",
    "StreamingStats",
    "clean_resize",
    "config_hash",
    "diffusers_baselines",
    "exact_testbed_errors",
    "extract_features",
    "fid_from_features",
    "fid_from_stats",
    "find_inception_weights",
    "frechet_distance",
    "generate_ground_truth",
    "iter_ground_truth",
    "load_ground_truth",
    "load_inception",
    "loglog_slope",
    "lpips",
    "lpips_available",
    "pipeline_manifest",
    "pipeline_sample_fn",
    "psnr",
    "quantize_images",
    "rmse",
    "ssim",
]
