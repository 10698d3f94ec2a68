"""Evaluation: full-step ground truth, features and FID, per-pair metrics, the exact-testbed errors, the bench.

The names are resolved on first use (PEP 562), so ``import diffsamplers.eval.cli`` (the console script) reads its
arguments before torch and diffusers are imported.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# public name -> submodule that defines it
_EXPORTS = {
    "InceptionFeatureExtractor": "features",
    "clean_resize": "features",
    "extract_features": "features",
    "find_inception_weights": "features",
    "load_inception": "features",
    "quantize_images": "features",
    "StreamingStats": "fid",
    "fid_from_features": "fid",
    "fid_from_stats": "fid",
    "frechet_distance": "fid",
    "config_hash": "ground_truth",
    "generate_ground_truth": "ground_truth",
    "iter_ground_truth": "ground_truth",
    "load_ground_truth": "ground_truth",
    "pipeline_manifest": "ground_truth",
    "pipeline_sample_fn": "ground_truth",
    "lpips": "metrics",
    "lpips_available": "metrics",
    "psnr": "metrics",
    "rmse": "metrics",
    "ssim": "metrics",
    "SamplerSpec": "testbed",
    "diffusers_baselines": "testbed",
    "exact_testbed_errors": "testbed",
    "loglog_slope": "testbed",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
