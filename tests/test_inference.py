"""After training, on a real run: evaluate (Ray, feature cache), predict, the MLflow model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
from conftest import layout_data, write_bad_videos, write_config
from mlflow.tracking import MlflowClient

from evl_platform.cli import main
from evl_platform.data.synth import SyntheticLayout
from evl_platform.ensemble.scores import load_scores
from evl_platform.tracking import names
from evl_platform.train.launcher import TrainOptions, train

pytestmark = pytest.mark.usefixtures("ray_local")

FIXED_VIEWS = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, motion_small: SyntheticLayout) -> tuple:
    """A finished training run on cached features (the local profile's default input path)."""
    tmp = tmp_path_factory.mktemp("trained")
    schedule = {"num_steps": 20, "batch_size": 4, "lr": 1e-3, "eval_every": 20, "log_every": 10}
    cfg = write_config(
        tmp / "exp.yaml",
        layout_data(motion_small, augment=FIXED_VIEWS, test_views={"temporal": 2, "spatial": 1}),
        name="tiny",
        train={**schedule, "checkpoint_every": 20, "amp": "none"},
        features={"reuse": True, "cache_dir": str(tmp / "features")},
    )
    uri = f"sqlite:///{tmp}/mlflow.db"
    options = TrainOptions(tracking_uri=uri, storage_path=str(tmp / "storage"))
    return train(cfg, options), uri, motion_small


def _run_json(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, object]:
    capsys.readouterr()
    status = main(argv)
    return status, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_reproduces_the_run_and_logs_other_views(
    trained: tuple, capsys: pytest.CaptureFixture
) -> None:
    outcome, uri, _ = trained
    client = MlflowClient(uri)
    before = client.get_run(outcome.run_id).data.metrics
    argv = ["evaluate", outcome.run_id, "--tracking-uri", uri, "--json"]
    status, same = _run_json(argv, capsys)
    assert status == 0
    assert same["views"] == "2x1" and same["videos"] == 10
    assert same["metrics"][names.EVAL_ACC1] == before[names.VAL_ACC1]
    assert same["metrics"][names.EVAL_LOSS] == pytest.approx(before[names.VAL_LOSS], rel=1e-6)

    status, two = _run_json([*argv, "--num-workers", "2", "--no-track"], capsys)
    assert status == 0 and two["run_id"] is None  # two Ray tasks, each every other video
    assert two["metrics"][names.EVAL_ACC1] == before[names.VAL_ACC1]

    status, other = _run_json([*argv, "--views", "1x1"], capsys)
    assert status == 0 and other["views"] == "1x1"
    assert other["metrics"][names.EVAL_LOSS] != same["metrics"][names.EVAL_LOSS]

    for result in (same, other):
        run = client.get_run(result["run_id"])
        assert run.data.tags[names.TAG_KIND] == names.KIND_EVALUATION
        assert run.data.tags[names.TAG_EVALUATED_RUN] == outcome.run_id
        assert run.data.params[names.PARAM_EVAL_VIEWS] == result["views"]
        assert run.data.metrics[names.EVAL_ACC1] == result["metrics"][names.EVAL_ACC1]
        scores = load_scores(result["run_id"], uri)  # what `evl-platform ensemble` reads
        assert scores.num_videos == 10
    after = client.get_run(outcome.run_id).data.metrics
    assert after == before  # the training run's metrics are never overwritten
    assert not any(k.startswith("eval/") for k in after)


def test_evaluate_by_run_name_prints_a_per_class_table(
    trained: tuple, capsys: pytest.CaptureFixture
) -> None:
    outcome, uri, layout = trained
    capsys.readouterr()
    argv = ["evaluate", outcome.run_name, "--split", "train", "--tracking-uri", uri, "--no-track"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "synthetic-motion train, 20 videos, 2x1 views" in out
    assert "top-1" in out and "top-5" in out
    with open(layout.label_map) as handle:
        first_class = next(iter(json.load(handle)))
    assert first_class in out


def test_predict_names_trained_classes_and_reports_a_corrupt_file(
    trained: tuple, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    outcome, uri, layout = trained
    videos = sorted(str(p) for p in Path(layout.root).rglob(f"*{layout.video_extension}"))[:4]
    bad = write_bad_videos(tmp_path / "bad")
    files = [videos[0], str(bad["truncated"]), *videos[1:], str(bad["missing"])]
    argv = ["predict", outcome.run_id, *files, "--topk", "3", "--tracking-uri", uri, "--json"]
    status, found = _run_json(argv, capsys)
    assert status == 1
    assert [entry["path"] for entry in found] == files
    assert found[1]["error"].startswith("unreadable") and found[-1]["error"].startswith("missing")
    class_names = load_scores(outcome.run_id, uri).class_names
    predicted = [entry for entry in found if "top" in entry]
    assert len(predicted) == len(videos)
    for entry in predicted:
        assert len(entry["top"]) == 3
        assert all(item["class"] in class_names for item in entry["top"])
        assert sum(item["probability"] for item in entry["top"]) <= 1 + 1e-6

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{outcome.run_id}/model")
    frame = model.predict(pd.DataFrame({"video": files}))
    labels = frame["label"].tolist()
    assert labels[1] == "" and frame["error"][1].startswith("unreadable")
    assert [labels[0], *labels[2:-1]] == [entry["top"][0]["class"] for entry in predicted]
    assert list(frame.columns[2:]) == list(class_names)
