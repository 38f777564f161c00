"""Datasets, reproducible splits, augmented views (:mod:`calibprompt.data.views`) and the feature cache."""

from calibprompt.data.datasets import DATASETS, DataError, Dataset, list_datasets, load_dataset
from calibprompt.data.features import FeatureResult, FeatureStore, default_cache_dir
from calibprompt.data.splits import (
    SplitManifest,
    calibration_split,
    cv_folds,
    default_per_class,
    few_shot,
    holdout_split,
    load_train_test,
    validation_split,
)

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "FeatureResult",
    "FeatureStore",
    "SplitManifest",
    "calibration_split",
    "cv_folds",
    "default_cache_dir",
    "default_per_class",
    "few_shot",
    "holdout_split",
    "list_datasets",
    "load_dataset",
    "load_train_test",
    "validation_split",
]
