"""Ensembles of two models' per-video scores: α search, matching, score files, MLflow, CLI.

The designed pair has 20 videos over 3 classes, each video's scores on its true class and one
other class only, so every video flips between right and wrong at one threshold α = t:

- 10 videos both models get right, 1 both get wrong (never counted);
- 4 only A gets right, with t = 0.25, 0.25, 0.45, 0.85: right for α > t;
- 5 only B gets right, with t = 0.35, 0.35, 0.35, 0.15, 0.65: right for α < t.

Counting per α gives 15 15 14 16 13 14 14 13 13 14 14 of 20 right at α = 0, 0.1, ..., 1:
A alone 70 %, B alone 75 %, the best ensemble 80 % at α = 0.3 (+10 over A, +5 over B).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from evl_platform.ensemble import (
    DEFAULT_ALPHAS,
    EnsembleError,
    ScoreTable,
    alpha_curve,
    choose_alpha,
    ensemble,
    load_scores,
    match,
)
from evl_platform.ensemble.cli import add_parser, parse_alphas, run
from evl_platform.tracking import Tracker, names
from evl_platform.tracking.artifacts import scores_frame, write_scores

CLASSES = ("jump", "run", "swim")
A_RIGHT = (0.25, 0.25, 0.45, 0.85)
B_RIGHT = (0.35, 0.35, 0.35, 0.15, 0.65)
CURVE = (75.0, 75.0, 70.0, 80.0, 65.0, 70.0, 70.0, 65.0, 65.0, 70.0, 70.0)


def _row(label: int, p_true: float) -> list[float]:
    """``p_true`` on the label, the rest on the next class, 0 on the third."""
    row = [0.0, 0.0, 0.0]
    row[label], row[(label + 1) % 3] = p_true, 1.0 - p_true
    return row


def designed() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(video ids, labels, A's probabilities, B's probabilities) of the designed pair."""
    pairs = [(0.9, 0.9)] * 10 + [(0.2, 0.2)]
    pairs += [(0.5 + 0.4 * (1 - t), 0.5 - 0.4 * t) for t in A_RIGHT]
    pairs += [(0.5 - 0.4 * (1 - t), 0.5 + 0.4 * t) for t in B_RIGHT]
    labels = np.arange(len(pairs)) % 3
    probs_a = np.array([_row(y, p) for y, (p, _) in zip(labels, pairs, strict=True)])
    probs_b = np.array([_row(y, p) for y, (_, p) in zip(labels, pairs, strict=True)])
    return [f"v{i:02d}" for i in range(len(pairs))], labels, probs_a, probs_b


def designed_tables() -> tuple[ScoreTable, ScoreTable]:
    ids, labels, probs_a, probs_b = designed()
    a = ScoreTable(tuple(ids), labels, CLASSES, probs_a, name="A-model", source="a")
    b = ScoreTable(tuple(ids), labels, CLASSES, probs_b, name="B-model", source="b")
    return a, b


def score_frame(
    ids: list[str], labels: np.ndarray | list | None, probs: np.ndarray, classes=CLASSES
) -> pd.DataFrame:
    frame = pd.DataFrame(probs, columns=list(classes))
    if labels is not None:
        frame.insert(0, "label", labels)
    frame.insert(0, "video_id", ids)
    return frame


def designed_files(tmp_path: Path) -> tuple[Path, Path]:
    """A as CSV with class-name labels; B as parquet with index labels, rows shuffled."""
    ids, labels, probs_a, probs_b = designed()
    a = tmp_path / "a.csv"
    score_frame(ids, [CLASSES[y] for y in labels], probs_a).to_csv(a, index=False)
    b = tmp_path / "b.parquet"
    order = np.random.default_rng(0).permutation(len(ids))
    frame = score_frame(ids, labels, probs_b).iloc[order]
    frame.to_parquet(b, index=False)
    return a, b


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="evl-platform")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["ensemble", *argv]))


def test_designed_pair_peaks_at_alpha_0_3() -> None:
    a, b = designed_tables()
    assert DEFAULT_ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert tuple(alpha_curve(a, b).values()) == CURVE
    result = ensemble(a, b)
    assert result.alphas == DEFAULT_ALPHAS and result.accuracies == CURVE
    assert (result.alpha, result.acc, result.acc_a, result.acc_b) == (0.3, 80.0, 70.0, 75.0)
    assert result.gain == pytest.approx(10.0)
    assert result.gain_best_member == pytest.approx(5.0)
    assert (result.num_videos, result.num_classes) == (20, 3)
    assert result.summary().startswith("A 70.0  B 75.0  A+B 80.0 at α=0.3 (+10.0 over A")
    swapped = ensemble(b, a)  # B's weight is 1 - α: the same optimum, mirrored
    assert swapped.accuracies == CURVE[::-1] and swapped.alpha == 0.7
    assert swapped.gain == pytest.approx(5.0)


def test_custom_alphas_are_sorted_and_checked() -> None:
    a, b = designed_tables()
    result = ensemble(a, b, [1, 0.55, 0.3, 0, 0.3])
    assert result.alphas == (0.0, 0.3, 0.55, 1.0)
    assert result.accuracies == (75.0, 80.0, 70.0, 70.0)
    for bad, message in (
        ([0.5, 1.5], "alpha 1.5 is outside [0, 1]"),
        ([-0.1], "alpha -0.1 is outside [0, 1]"),
        ([], "no alphas"),
        ([0.12, 0.123], "share MLflow step 12"),
    ):
        with pytest.raises(EnsembleError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ensemble(a, b, bad)


def test_choose_alpha_prefers_the_best_then_closest_to_half_then_smaller() -> None:
    assert choose_alpha({0.1: 70.0, 0.3: 80.0, 0.7: 80.0}) == 0.3  # 0.7 - 0.5 < 0.2 in floats
    assert choose_alpha({0.2: 80.0, 0.6: 80.0, 0.9: 80.0}) == 0.6
    assert choose_alpha({0.4: 80.0, 0.5: 80.0, 0.6: 80.0}) == 0.5
    assert choose_alpha({0.0: 50.0, 1.0: 50.0}) == 0.0
    assert choose_alpha({0.0: 50.0, 0.9: 50.1}) == 0.9
    a, _ = designed_tables()
    assert ensemble(a, a).alpha == 0.5  # a flat curve


def test_csv_and_parquet_files_match_by_video_id(tmp_path: Path) -> None:
    path_a, path_b = designed_files(tmp_path)
    a, b = load_scores(path_a), load_scores(str(path_b))
    assert a.class_names == CLASSES and a.name == "a.csv" and a.notes == ()
    assert list(a.labels) == list(designed()[1])
    result = ensemble(a, b)
    assert result.accuracies == CURVE and result.alpha == 0.3
    assert result.member_a == str(path_a.resolve())


def test_logits_go_through_softmax_and_say_so(tmp_path: Path) -> None:
    ids, labels, probs_a, probs_b = designed()
    logits = np.log(np.clip(probs_a, 1e-12, None)) + 2.0  # (N, C), some negative
    score_frame(ids, labels, logits).to_csv(tmp_path / "logits.csv", index=False)
    table = load_scores(tmp_path / "logits.csv")
    np.testing.assert_allclose(table.probs, probs_a, atol=1e-9)
    assert table.notes == (
        "logits.csv: scores read as logits (20 rows with negative scores, 20 rows not summing "
        "to 1 (±0.01)): softmax applied",
    )
    _, b = designed_tables()
    result = ensemble(table, b)
    assert result.accuracies == CURVE and result.notes == table.notes
    # Probabilities rounded to 3 decimals still count as probabilities (renormalised).
    score_frame(ids, labels, probs_a.round(3) * 0.999).to_csv(tmp_path / "p.csv", index=False)
    rounded = load_scores(tmp_path / "p.csv")
    assert rounded.notes == () and np.allclose(rounded.probs.sum(axis=1), 1.0)


def test_mismatched_videos_name_the_counts(tmp_path: Path) -> None:
    ids, labels, probs_a, probs_b = designed()
    ids = [str(10 + i) for i in range(20)]
    score_frame(ids, labels, probs_a).to_csv(tmp_path / "a.csv", index=False)
    keep = [i for i in range(20) if ids[i] not in ("17", "23")]
    frame = score_frame([ids[i] for i in keep], labels[keep], probs_b[keep])
    frame.to_csv(tmp_path / "b.csv", index=False)
    a, b = load_scores(tmp_path / "a.csv"), load_scores(tmp_path / "b.csv")
    with pytest.raises(EnsembleError) as err:
        match(a, b)
    assert str(err.value) == (
        "A (a.csv) has 20 videos, B (b.csv) has 18: 2 only in A (first: 17, 23), 0 only in B"
    )
    with pytest.raises(EnsembleError, match=r"0 only in A, 2 only in B \(first: 17, 23\)"):
        match(b, a)


def test_mismatched_classes() -> None:
    a, b = designed_tables()
    ids = b.video_ids
    four = ScoreTable(ids, None, (*CLASSES, "walk"), np.hstack([b.probs, np.zeros((20, 1))]))
    with pytest.raises(EnsembleError, match=r"^A \(A-model\) has 3 classes, B \(scores\) has 4$"):
        match(a, four)
    renamed = ScoreTable(ids, None, ("jump", "running", "swimming"), b.probs, name="other")
    with pytest.raises(EnsembleError) as err:
        match(a, renamed)
    assert str(err.value) == (
        "A (A-model) and B (other) have different class names at 2 of 3 positions "
        "(first: #1 'run' vs 'running', #2 'swim' vs 'swimming')"
    )
    order = [2, 0, 1]  # B's columns in another order, its labels as B's indices
    reordered = ScoreTable(
        ids, np.argsort(order)[b.labels], tuple(CLASSES[i] for i in order), b.probs[:, order]
    )
    result = ensemble(a, reordered)
    assert result.accuracies == CURVE
    assert "scores: class columns reordered to match A-model" in result.notes


def test_labels_from_either_side_and_disagreement() -> None:
    a, b = designed_tables()
    unlabelled_a = ScoreTable(a.video_ids, None, CLASSES, a.probs, name="A-model")
    unlabelled_b = ScoreTable(b.video_ids, None, CLASSES, b.probs, name="B-model")
    assert ensemble(unlabelled_a, b).accuracies == CURVE
    assert ensemble(a, unlabelled_b).accuracies == CURVE
    with pytest.raises(EnsembleError, match="neither A .A-model. nor B .B-model. has labels"):
        ensemble(unlabelled_a, unlabelled_b)
    wrong = b.labels.copy()
    wrong[[3, 5]] = (wrong[[3, 5]] + 1) % 3
    relabelled = ScoreTable(b.video_ids, wrong, CLASSES, b.probs, name="B-model")
    with pytest.raises(EnsembleError) as err:
        match(a, relabelled)
    assert str(err.value) == (
        "A (A-model) and B (B-model) disagree on the label of 2 of 20 videos "
        "(first: v03 ('jump' vs 'run'), v05 ('swim' vs 'jump'))"
    )


BAD_FILES = {
    "no_id.csv": ("name,label,a,b\nx,0,0.5,0.5\n", "no video id column (expected 'video_id'"),
    "text.csv": ("id,label,a,path\nx,0,0.5,p.mp4\n", "non-numeric class column(s) 'path'"),
    "dup.csv": ("id,a,b\nx,0.5,0.5\ny,1,0\nx,0,1\n", "1 duplicate video ids (first: x)"),
    "empty.csv": ("", "empty file"),
    "header.csv": ("video_id,label,a,b\n", "no videos (the table has no rows)"),
    "one_class.csv": ("id,a\nx,1\n", "1 class score columns, need at least 2"),
    "nan.csv": ("id,a,b\nx,0.5,\ny,0.5,0.5\n", "1 videos with missing or infinite scores"),
    "label.csv": ("id,label,a,b\nx,2,0.5,0.5\n", "labels must be class indices 0..1"),
    "name.csv": ("id,label,a,b\nx,c,0.5,0.5\n", "labels that are not class columns: 'c'"),
    "scores.txt": ("id,a,b\n", "unknown file type '.txt'"),
    "broken.parquet": ("not parquet", "cannot be read as parquet"),
}


@pytest.mark.parametrize("file_name", sorted(BAD_FILES))
def test_bad_score_files_give_one_message_naming_the_file(tmp_path: Path, file_name: str) -> None:
    content, message = BAD_FILES[file_name]
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(EnsembleError) as err:
        load_scores(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_paths_and_stores_are_not_run_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EnsembleError, match="^missing.csv: no such file$"):
        load_scores("missing.csv")
    with pytest.raises(EnsembleError, match="not a file"):
        load_scores(tmp_path)
    with pytest.raises(EnsembleError, match="there is no MLflow store at"):
        load_scores("0123abcd", "sqlite:///nowhere.db")
    assert not (tmp_path / "nowhere.db").exists()


def test_cli_bad_file_exits_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path_a, _ = designed_files(tmp_path)
    (tmp_path / "bad.csv").write_text("name,a,b\nx,1,0\n")
    assert cli(str(path_a), str(tmp_path / "bad.csv"), "--no-track") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {tmp_path / 'bad.csv'}: no video id column")
    assert captured.err.count("\n") == 1


def test_cli_alphas_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_alphas("0,0.25,0.5,0.75,1") == (0.0, 0.25, 0.5, 0.75, 1.0)
    for bad in ("0,1.5", "0,x", ""):
        with pytest.raises(SystemExit) as exit_:
            cli("a.csv", "b.csv", "--alphas", bad)
        assert exit_.value.code == 2
    assert "outside [0, 1]" in capsys.readouterr().err


def test_cli_on_files_without_tracking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path_a, path_b = designed_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli(str(path_a), str(path_b), "--no-track", "--alphas", "0,0.3,1") == 0
    out = capsys.readouterr().out
    assert "  0.30  80.00  <- chosen" in out
    assert "A 70.0  B 75.0  A+B 80.0 at α=0.3 (+10.0 over A" in out
    assert "MLflow" not in out and not (tmp_path / "mlflow.db").exists()


def _training_run(tracker: Tracker, name: str, probs: np.ndarray, order: np.ndarray) -> str:
    """A finished run carrying ``val_scores.parquet`` as a training run writes it."""
    ids, labels, _, _ = designed()
    run_id = tracker.create_run("train", run_name=name, tags={names.TAG_DATASET: "toy"})
    frame = scores_frame(ids, order, labels[order], probs[order], CLASSES)
    directory = Path(tracker.uri.removeprefix("sqlite:///")).parent / name
    directory.mkdir()
    tracker.log_artifact(run_id, write_scores(frame, directory / names.ARTIFACT_SCORES))
    tracker.terminate(run_id)
    return run_id


def test_cli_on_mlflow_runs_logs_one_ensemble_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    _, _, probs_a, probs_b = designed()
    run_a = _training_run(tracker, "evl-a", probs_a, np.arange(20))
    run_b = _training_run(tracker, "evl-b", probs_b, np.arange(20)[::-1])
    assert cli(run_a, run_b, "--tracking-uri", uri, "--name", "a+b") == 0
    out = capsys.readouterr().out
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(names.ENSEMBLE_EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert f"MLflow run {run.info.run_id} in experiment ensembles" in out
    assert run.info.run_name == "a+b" and run.info.status == "FINISHED"
    assert run.data.tags[names.TAG_KIND] == names.KIND_ENSEMBLE
    assert (run.data.tags[names.TAG_MEMBER_A], run.data.tags[names.TAG_MEMBER_B]) == (run_a, run_b)
    assert run.data.tags[names.TAG_MEMBER_A_NAME] == "evl-a"
    assert run.data.tags[names.TAG_DATASET] == "toy"
    params = run.data.params
    assert params[names.PARAM_ENSEMBLE_ALPHAS] == "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"
    assert (params[names.PARAM_ENSEMBLE_MEMBER_A], params[names.PARAM_ENSEMBLE_VIDEOS]) == (
        run_a,
        "20",
    )
    history = client.get_metric_history(run.info.run_id, names.ENSEMBLE_ACC1)
    assert sorted((m.step, m.value) for m in history) == list(
        zip(range(0, 101, 10), CURVE, strict=True)
    )
    metrics = run.data.metrics
    assert metrics[names.ENSEMBLE_ALPHA] == pytest.approx(0.3)
    assert metrics[names.ENSEMBLE_ACC1_BEST] == pytest.approx(80.0)
    assert (metrics[names.ENSEMBLE_ACC1_A], metrics[names.ENSEMBLE_ACC1_B]) == (70.0, 75.0)
    assert metrics[names.ENSEMBLE_GAIN] == pytest.approx(10.0)
    assert metrics[names.ENSEMBLE_GAIN_BEST_MEMBER] == pytest.approx(5.0)
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert artifacts == {names.ARTIFACT_ENSEMBLE_CURVE, names.ARTIFACT_ENSEMBLE_PLOT}
    local = client.download_artifacts(run.info.run_id, names.ARTIFACT_ENSEMBLE_CURVE, tmp_path)
    curve = pd.read_csv(local)
    assert list(curve.columns) == ["alpha", "acc1"]
    assert tuple(curve["alpha"]) == DEFAULT_ALPHAS and tuple(curve["acc1"]) == CURVE
    plot = client.download_artifacts(run.info.run_id, names.ARTIFACT_ENSEMBLE_PLOT, tmp_path)
    assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_run_and_run_without_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    empty = tracker.create_run("train", run_name="crashed", tags={})
    tracker.terminate(empty, "FAILED")
    with pytest.raises(EnsembleError, match="^0123abcd: not a score file, and no such run in"):
        load_scores("0123abcd", uri)
    with pytest.raises(EnsembleError) as err:
        load_scores(empty, uri)
    assert str(err.value) == (
        f"run {empty} (crashed, FAILED): no val_scores.parquet artifact (artifacts: none); "
        "only a finished training run has one"
    )
    assert cli(empty, empty, "--tracking-uri", uri) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after MLflow's own log lines
    assert last.startswith(f"error: run {empty} (crashed, FAILED)")
