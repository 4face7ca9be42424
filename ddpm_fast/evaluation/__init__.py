"""The paper's evaluations, one module each: the variational bound, progressive coding and interpolation
(bound.py), FID from TF's Inception where its weights are on disk (fid.py), and a small classifier's metrics that
need no download (quality.py); the Fréchet distance both metrics use is frechet.py's."""
from ddpm_fast.evaluation.bound import NLLReport, RateDistortion, interpolate, nll, rate_distortion
from ddpm_fast.evaluation.fid import InceptionStats, fid, inception_stats
from ddpm_fast.evaluation.frechet import frechet_distance, gaussian_frechet
from ddpm_fast.evaluation.quality import FeatureClassifier, QualityReport, sample_quality, train_classifier

__all__ = ["FeatureClassifier", "InceptionStats", "NLLReport", "QualityReport", "RateDistortion", "fid",
           "frechet_distance", "gaussian_frechet", "inception_stats", "interpolate", "nll", "rate_distortion",
           "sample_quality", "train_classifier"]
