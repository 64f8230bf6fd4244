"""Metric, tag and artifact names, defined once for training, sweeps, benchmarks and reports."""

from __future__ import annotations

# Training metrics, logged by step.
TRAIN_LOSS = "train/loss"
TRAIN_ACC1 = "train/acc1"
TRAIN_LR = "train/lr"
TRAIN_CLIPS_PER_S = "train/clips_per_s"
DEVICE_HOURS = "train/device_hours"
BAD_VIDEOS = "data/bad_videos"

# Validation metrics, logged at every evaluation step.
VAL_LOSS = "val/loss"
VAL_ACC1 = "val/acc1"
VAL_ACC5 = "val/acc5"
VAL_MEAN_CLASS_ACC = "val/mean_class_acc1"
VAL_CLIPS_PER_S = "val/clips_per_s"

# Frozen-feature reuse: clips the extraction ran the backbone on, and images the training
# workers themselves ran the backbone on (zero when every feature came from the cache).
FEATURES_EXTRACTED_CLIPS = "features/extracted_clips"
FEATURES_SECONDS = "features/extract_seconds"
BACKBONE_FORWARD_IMAGES = "train/backbone_forward_images"

STEP_METRICS = (TRAIN_LOSS, TRAIN_ACC1, TRAIN_LR, TRAIN_CLIPS_PER_S, DEVICE_HOURS, BAD_VIDEOS)
EVAL_METRICS = (VAL_LOSS, VAL_ACC1, VAL_ACC5, VAL_MEAN_CLASS_ACC, VAL_CLIPS_PER_S)

# Tags carried by every run.
TAG_PROFILE = "profile"
TAG_DATASET = "dataset"
TAG_BACKBONE = "backbone"
TAG_GIT_COMMIT = "git_commit"
TAG_VARIANT = "variant"
TAG_KIND = "kind"  # train | benchmark
TAG_RAY_RUN = "ray_run"  # Ray Train run name (storage_path/<name>): what --resume continues

# Artifacts of a training run.
ARTIFACT_CONFIG = "config.yaml"
ARTIFACT_SCORES = "val_scores.parquet"
ARTIFACT_CONFUSION = "confusion_matrix.png"
ARTIFACT_PER_CLASS = "val_per_class.csv"
ARTIFACT_WEIGHTS = "weights.pt"

BENCHMARK_EXPERIMENT = "benchmarks"
