"""Frozen-feature reuse: backbone outputs extracted once into a content-addressed cache.

``prepare_features(cfg)`` (on a Ray driver) extracts what is missing; ``FeatureDataset(cfg,
split)`` then serves batches of cached features in place of the backbone.
"""

from evl_platform.features.dataset import FeatureBatch, FeatureDataset, MissingFeatures
from evl_platform.features.extract import FeatureStats, prepare_features
from evl_platform.features.key import (
    FORMAT_VERSION,
    EntryRef,
    extraction_identity,
    split_entries,
    view_data,
    view_set,
    weights_identity,
)
from evl_platform.features.store import FeatureStore, StoredEntry, features_root

__all__ = [
    "FORMAT_VERSION",
    "EntryRef",
    "FeatureBatch",
    "FeatureDataset",
    "FeatureStats",
    "FeatureStore",
    "MissingFeatures",
    "StoredEntry",
    "extraction_identity",
    "features_root",
    "prepare_features",
    "split_entries",
    "view_data",
    "view_set",
    "weights_identity",
]
