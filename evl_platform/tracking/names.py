"""Metric, tag and artifact names, defined once for training, sweeps, benchmarks and reports."""

from __future__ import annotations

# The step every report of a training run carries (Ray Train reports, Tune results): steps done.
REPORT_STEP = "step"

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

# Where a training's wall time went, reported with its last step (never logged to MLflow: a
# pack's phases belong to all its members at once); see TIME_PHASES.
TIME_PREFIX = "time/"
TIME_SYNTHESIS = "time/synthesis_s"  # resolving the data, generating a stand-in
TIME_FEATURES = "time/features_s"  # extracting the frozen features into the cache
TIME_STARTUP = "time/startup_s"  # Ray Train start-up, model building, restore, checkpoints
TIME_TRAIN = "time/train_s"  # optimisation steps (batch loading included)
TIME_VALIDATION = "time/validation_s"  # validation passes
TIME_TRACKING = "time/tracking_s"  # MLflow runs, params, artifacts and models
TIME_PHASES = {
    TIME_SYNTHESIS: "data synthesis",
    TIME_FEATURES: "feature extraction",
    TIME_STARTUP: "Ray/Train start-up",
    TIME_TRAIN: "training",
    TIME_VALIDATION: "validation",
    TIME_TRACKING: "tracking",
}
BACKBONE_FORWARD_IMAGES = "train/backbone_forward_images"
DATA_WAIT = "data/wait_s"  # seconds a training step waited for its batch (mean per step)

# The model's size, logged once at step 0 when the run is created (paper conventions: new
# params = decoder + temporal modules + head; GFLOPs = multiply-accumulates x test views).
MODEL_NEW_PARAMS = "model/new_params"
MODEL_GFLOPS = "model/gflops_per_video"

STEP_METRICS = (
    TRAIN_LOSS,
    TRAIN_ACC1,
    TRAIN_LR,
    TRAIN_CLIPS_PER_S,
    DEVICE_HOURS,
    BAD_VIDEOS,
    DATA_WAIT,
)
EVAL_METRICS = (VAL_LOSS, VAL_ACC1, VAL_ACC5, VAL_MEAN_CLASS_ACC, VAL_CLIPS_PER_S)

# Tags carried by every run.
TAG_PROFILE = "profile"
TAG_DATASET = "dataset"
TAG_BACKBONE = "backbone"
TAG_GIT_COMMIT = "git_commit"
TAG_VARIANT = "variant"
TAG_KIND = "kind"  # one of the KIND_* values below
TAG_RAY_RUN = "ray_run"  # Ray Train run name (storage_path/<name>): what --resume continues
TAG_PACK = "evl.pack"  # the pack (one Ray Train run training several decoders) a run was in
TAG_FAILURE = "evl.failure"  # why a run ended FAILED while the rest of its pack went on

# A pack reports every member's metrics in one Ray Train report, each name prefixed with the
# member's key and this separator (a run of its own has the key "" and no prefix).
MEMBER_SEPARATOR = "::"


def member_metric(member: str, metric: str) -> str:
    """The name a pack reports ``member``'s ``metric`` under."""
    return f"{member}{MEMBER_SEPARATOR}{metric}" if member else metric


def split_member_metric(name: str) -> tuple[str, str]:
    """``(member, metric)`` of a reported name (``member`` is ``""`` without a prefix)."""
    member, separator, metric = name.partition(MEMBER_SEPARATOR)
    return (member, metric) if separator else ("", name)


# Kinds of run (values of TAG_KIND).
KIND_TRAIN = "train"  # one training run (alone, or a sweep's trial)
KIND_SWEEP = "sweep"  # a sweep's parent run
KIND_BENCHMARK = "benchmark"  # one `evl-platform bench` measurement
# KIND_ENSEMBLE is with the ensemble names below.

# MLflow run statuses the platform writes and reads (mlflow.entities.RunStatus names).
STATUS_RUNNING = "RUNNING"
STATUS_FINISHED = "FINISHED"
STATUS_FAILED = "FAILED"
STATUS_KILLED = "KILLED"

# Tags of sweep runs: the parent (kind "sweep") and its nested trial runs.
TAG_ABLATION = "ablation"  # the ablation file's name, e.g. temporal_modules
TAG_PAPER_TABLE = "paper_table"  # the paper table the sweep fills, e.g. 8a
TAG_PAPER_ROW = "paper_row"  # the variant's row id in that table
TAG_DATASET_KEY = "dataset_key"  # the ablation's dataset column (k400, ssv2), whatever stands in
TAG_SEED = "seed"
TAG_TRIAL = "trial"  # the trial's key within its sweep, e.g. none/ssv2/seed0
TAG_SWEEP = "sweep"  # the parent run's name
TAG_EARLY_STOPPED = "early_stopped"  # "true" when the search scheduler (ASHA) stopped the trial
# Every table cell a sweep's training run fills (a run of a batch over several ablation files
# fills each cell of an identical trial): a JSON list of {ablation, paper_table, row,
# dataset_key, trial, parent_run_id}, one entry per cell, its own table's first.
TAG_CELLS = "evl.cells"
# One tag per (ablation, dataset column) the run fills, its value the paper row, so that a
# search finds it: tags.`cell.feature_layers.k400` = '-4,-3,-2,-1'.
TAG_CELL_PREFIX = "cell."
TAG_BATCH = "evl.batch"  # on a sweep's parent run: the batch (several ablation files) it ran in


def cell_tag(ablation: str, dataset_key: str) -> str:
    """The tag naming the row a run fills in ``ablation``'s ``dataset_key`` column."""
    return f"{TAG_CELL_PREFIX}{ablation}.{dataset_key}"


# Artifacts of a training run.
ARTIFACT_CONFIG = "config.yaml"
ARTIFACT_SCORES = "val_scores.parquet"
ARTIFACT_CONFUSION = "confusion_matrix.png"
ARTIFACT_PER_CLASS = "val_per_class.csv"
ARTIFACT_WEIGHTS = "weights.pt"

# Artifacts of a sweep's parent run.
ARTIFACT_ABLATION = "ablation.yaml"
ARTIFACT_RESULTS_CSV = "results.csv"
ARTIFACT_RESULTS_MD = "results.md"

BENCHMARK_EXPERIMENT = "benchmarks"

# Ensembles of two models' per-video scores (paper Tables 10-11), one run per pair, written by
# evl_platform.ensemble. Scores are alpha * P_A + (1 - alpha) * P_B: alpha is model A's weight.
ENSEMBLE_EXPERIMENT = "ensembles"
KIND_ENSEMBLE = "ensemble"  # value of TAG_KIND
TAG_MEMBER_A = "ensemble.member_a"  # model A: an MLflow run id or a score file path
TAG_MEMBER_B = "ensemble.member_b"
TAG_MEMBER_A_NAME = "ensemble.member_a_name"  # run name or file name
TAG_MEMBER_B_NAME = "ensemble.member_b_name"
PARAM_ENSEMBLE_ALPHAS = "ensemble.alphas"  # comma-separated alphas searched
PARAM_ENSEMBLE_MEMBER_A = "ensemble.member_a"
PARAM_ENSEMBLE_MEMBER_B = "ensemble.member_b"
PARAM_ENSEMBLE_VIDEOS = "ensemble.num_videos"
PARAM_ENSEMBLE_CLASSES = "ensemble.num_classes"
ENSEMBLE_ACC1 = "ensemble/acc1"  # top-1 (%) at each alpha, logged at step round(alpha * 100)
ENSEMBLE_ALPHA = "ensemble/alpha"  # the chosen alpha; the summary metrics are at step 0
ENSEMBLE_ACC1_BEST = "ensemble/acc1_best"  # top-1 (%) at the chosen alpha
ENSEMBLE_ACC1_A = "ensemble/acc1_a"  # model A alone
ENSEMBLE_ACC1_B = "ensemble/acc1_b"  # model B alone
ENSEMBLE_GAIN = "ensemble/gain"  # acc1_best - acc1_a: the paper's delta
ENSEMBLE_GAIN_BEST_MEMBER = "ensemble/gain_best_member"  # acc1_best - max(acc1_a, acc1_b)
ARTIFACT_ENSEMBLE_CURVE = "ensemble_curve.csv"  # alpha,acc1
ARTIFACT_ENSEMBLE_PLOT = "ensemble_curve.png"  # accuracy vs alpha, members marked

# After training (evl_platform.inference): evaluations of a trained run under chosen views,
# one run each (kind "evaluation", linked to the run it evaluates), and imported checkpoints.
KIND_EVALUATION = "evaluation"  # value of TAG_KIND
KIND_IMPORT = "import"  # an official checkpoint imported by `evl-platform import-checkpoint`
TAG_EVALUATED_RUN = "eval.source_run"  # the evaluated run's id
TAG_IMPORTED_FROM = "import.source"  # the imported checkpoint file
PARAM_EVAL_SPLIT = "eval.split"
PARAM_EVAL_VIEWS = "eval.views"  # "TxS": temporal x spatial views
EVAL_LOSS = "eval/loss"
EVAL_ACC1 = "eval/acc1"
EVAL_ACC5 = "eval/acc5"
EVAL_MEAN_CLASS_ACC = "eval/mean_class_acc1"
EVAL_CLIPS_PER_S = "eval/clips_per_s"
ARTIFACT_MODEL = "model"  # the MLflow (pyfunc) model directory of a trained or imported run
