"""Annotation readers: the official EVL list, Kinetics CSV and SSv2 JSON, and their errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from evl_platform.config.schema import AnnotationFormat
from evl_platform.data.annotations import (
    ANNOTATION_READERS,
    AnnotationError,
    Annotations,
    VideoRecord,
    read_annotations,
    read_label_map,
    save_label_map,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "annotations"
K400_TRAIN_CLASSES = (
    "abseiling",
    "air drumming",
    "passing American football (in game)",
    "passing American football (not in game)",
    "tying knot (not on a tie)",
    "zumba",
)
SSV2_CLASSES = (
    "Approaching something with your camera",
    "Holding something next to something",
    "Moving something and something closer to each other",
    "Pushing something from left to right",
    "Pushing something from right to left",
    "Putting something into something",
)


@pytest.fixture(autouse=True)
def _in_fixtures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name files relative to the fixtures folder, so messages read as a user sees them."""
    monkeypatch.chdir(FIXTURES)


def _rows(annotations: Annotations) -> list[tuple[str, Path, int]]:
    return [(r.video_id, r.path, r.label) for r in annotations.records]


def _error(path: str | Path, **kwargs: object) -> str:
    with pytest.raises(AnnotationError) as info:
        read_annotations(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_readers_cover_the_config_formats() -> None:
    assert sorted(ANNOTATION_READERS) == sorted(get_args(AnnotationFormat))


def test_unknown_format_is_the_registry_error() -> None:
    with pytest.raises(KeyError, match="unknown annotation format 'csv' \\(registered: evl_list"):
        read_annotations("kinetics/train.csv", format="csv")


# --- Kinetics CSV -------------------------------------------------------------------------


def test_kinetics_train_records_and_sorted_classes() -> None:
    ann = read_annotations("kinetics/train.csv", format="kinetics_csv")
    k = FIXTURES / "kinetics"
    assert ann.source == k / "train.csv"
    assert ann.class_names == K400_TRAIN_CLASSES
    assert ann.num_classes == 6 and len(ann) == 7
    assert _rows(ann) == [
        ("--07WQ2iBlw_000001_000011", k / "--07WQ2iBlw_000001_000011.mp4", 0),
        ("-VtLx-mcPds_000014_000024", k / "-VtLx-mcPds_000014_000024.mp4", 1),
        ("-5rmZhTpIkE_000006_000016", k / "-5rmZhTpIkE_000006_000016.mp4", 2),
        ("0Ha8xOZ_WEk_000000_000010", k / "0Ha8xOZ_WEk_000000_000010.mp4", 3),
        ("1xTVxZNMNN4_000233_000243", k / "1xTVxZNMNN4_000233_000243.mp4", 4),
        ("2aQbhqTlYf8_000042_000052", k / "2aQbhqTlYf8_000042_000052.mp4", 5),
        ("-3B32lodo2M_000059_000069", k / "-3B32lodo2M_000059_000069.mp4", 0),
    ]
    assert all(isinstance(r, VideoRecord) and r.path.is_absolute() for r in ann.records)


def test_kinetics_validation_reuses_the_training_class_order(tmp_path: Path) -> None:
    train = read_annotations("kinetics/train.csv", format="kinetics_csv")
    val = read_annotations(
        "kinetics/validate.csv",
        format="kinetics_csv",
        class_names=train.class_names,
        root=tmp_path,
        video_extension="mkv",
    )
    assert val.class_names == K400_TRAIN_CLASSES
    assert _rows(val) == [
        ("-DAlqb2z2rI_000030_000040", tmp_path / "-DAlqb2z2rI_000030_000040.mkv", 5),
        ("0_XqJ3bhUdU_000005_000015", tmp_path / "0_XqJ3bhUdU_000005_000015.mkv", 1),
        ("3gW_xMFXUhk_000120_000130", tmp_path / "3gW_xMFXUhk_000120_000130.mkv", 4),
    ]
    alone = read_annotations("kinetics/validate.csv", format="kinetics_csv")
    assert alone.class_names == ("air drumming", "tying knot (not on a tie)", "zumba")
    assert [r.label for r in alone.records] == [2, 0, 1]


def test_kinetics_label_map_fixes_the_order(tmp_path: Path) -> None:
    save_label_map(list(reversed(K400_TRAIN_CLASSES)), tmp_path / "k400_labels.json")
    ann = read_annotations(
        "kinetics/validate.csv", format="kinetics_csv", label_map=tmp_path / "k400_labels.json"
    )
    assert ann.class_names == tuple(reversed(K400_TRAIN_CLASSES))
    assert [r.label for r in ann.records] == [0, 4, 1]
    first = read_annotations(
        "kinetics/validate.csv",
        format="kinetics_csv",
        label_map=tmp_path / "k400_labels.json",
        class_names=K400_TRAIN_CLASSES,
    )
    assert first.class_names == K400_TRAIN_CLASSES  # class_names take precedence
    with pytest.raises(ValueError, match="class_names must be non-empty and unique"):
        read_annotations("kinetics/validate.csv", format="kinetics_csv", class_names=["a", "a"])


def test_kinetics_class_subdirectory_layout(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "ann" / "train.csv",
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,aaaaaaaaaaa,1,11,train\n"
        '"passing American football (in game)",bbbbbbbbbbb,6.0,16.0,train\n'
        "zumba,ccccccccccc,0,10,train\n"
        "zumba,ddddddddddd,20,30,train\n",
    )
    root = tmp_path / "videos"
    for rel in (
        "abseiling/aaaaaaaaaaa_000001_000011.mp4",
        "passing American football (in game)/bbbbbbbbbbb_000006_000016.mp4",
        "zumba/ccccccccccc_000000_000010.mp4",  # also flat below: the flat copy wins
        "ccccccccccc_000000_000010.mp4",
    ):
        _write(root / rel, "")
    ann = read_annotations(csv_path, format="kinetics_csv", root=root)
    assert [r.path for r in ann.records] == [
        root / "abseiling" / "aaaaaaaaaaa_000001_000011.mp4",
        root / "passing American football (in game)" / "bbbbbbbbbbb_000006_000016.mp4",
        root / "ccccccccccc_000000_000010.mp4",
        root / "ddddddddddd_000020_000030.mp4",  # in neither place: the flat path, unchecked
    ]
    assert ann.class_names == ("abseiling", "passing American football (in game)", "zumba")


def test_kinetics_quoted_label_with_comma_and_crlf(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "train.csv",
        "\ufefflabel,youtube_id,time_start,time_end,split\r\n"
        '"cooking, outdoors",aaaaaaaaaaa,3,13,train\r\n'
        "abseiling,bbbbbbbbbbb,12.0,22.0,train\r\n",
    )
    ann = read_annotations(path, format="kinetics_csv", video_extension=".avi")
    assert ann.class_names == ("abseiling", "cooking, outdoors")
    assert _rows(ann) == [
        ("aaaaaaaaaaa_000003_000013", tmp_path / "aaaaaaaaaaa_000003_000013.avi", 1),
        ("bbbbbbbbbbb_000012_000022", tmp_path / "bbbbbbbbbbb_000012_000022.avi", 0),
    ]


def test_kinetics_errors() -> None:
    assert _error("broken/kinetics_bad_header.csv", format="kinetics_csv") == (
        "broken/kinetics_bad_header.csv: missing column(s) youtube_id "
        "(header: label,youtube,time_start,time_end,split)"
    )
    assert _error("broken/kinetics_bad_time.csv", format="kinetics_csv") == (
        "broken/kinetics_bad_time.csv:4: time_start 'abc' is not a number"
    )
    train = read_annotations("kinetics/train.csv", format="kinetics_csv")
    message = _error(
        "broken/kinetics_unknown_class.csv", format="kinetics_csv", class_names=train.class_names
    )
    assert message == (
        "broken/kinetics_unknown_class.csv:3: label 'juggling fire' is not in the given class_names"
    )


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("zumba,ccccccccccc,0.5,10,train\n", ":2: time_start '0.5' is not a whole, non-negative"),
        ("zumba,ccccccccccc,0,-10,train\n", ":2: time_end '-10' is not a whole, non-negative"),
        ("zumba,ccccccccccc,0,10\n", ":2: expected 5 fields (label,youtube_id,time_start,"),
        ("cooking, outdoors,ccccccccccc,0,10,train\n", ":2: expected 5 fields"),
        (",ccccccccccc,0,10,train\n", ":2: empty label"),
        ("zumba,a,0,10,train\n\nabseiling,a,0.0,10.0,train\n", ":4: duplicate video id "),
        ("", ": no rows after the header"),
    ],
)
def test_kinetics_row_errors(tmp_path: Path, rows: str, expected: str) -> None:
    path = _write(tmp_path / "train.csv", "label,youtube_id,time_start,time_end,split\n" + rows)
    assert _error(path, format="kinetics_csv").startswith(f"{path}{expected}")


def test_kinetics_duplicate_message(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "t.csv",
        "label,youtube_id,time_start,time_end,split\nzumba,a,0,10,x\nzumba,a,0.0,10.0,x\n",
    )
    assert _error(path, format="kinetics_csv") == (
        f"{path}:3: duplicate video id 'a_000000_000010' (first on line 2)"
    )


# --- Something-Something-v2 JSON ----------------------------------------------------------


def test_ssv2_train_records() -> None:
    ann = read_annotations("ssv2/train.json", format="ssv2_json", label_map="ssv2/labels.json")
    s = FIXTURES / "ssv2"
    assert ann.source == s / "train.json"
    assert ann.class_names == SSV2_CLASSES
    assert _rows(ann) == [
        ("78687", s / "78687.webm", 1),
        ("42326", s / "42326.webm", 3),
        ("100904", s / "100904.webm", 5),
        ("80715", s / "80715.webm", 4),
        ("34899", s / "34899.webm", 0),
    ]


def test_ssv2_validation_with_root_and_extension(tmp_path: Path) -> None:
    ann = read_annotations(
        "ssv2/validation.json",
        format="ssv2_json",
        label_map="ssv2/labels.json",
        root=tmp_path,
        video_extension=".mp4",
    )
    assert ann.class_names == SSV2_CLASSES
    assert _rows(ann) == [
        ("74225", tmp_path / "74225.mp4", 2),
        ("116154", tmp_path / "116154.mp4", 3),
    ]


def test_ssv2_errors() -> None:
    labels = {"format": "ssv2_json", "label_map": "ssv2/labels.json"}
    assert _error("ssv2/train.json", format="ssv2_json") == (
        "ssv2/train.json: ssv2_json needs a label map (labels.json: class -> index)"
    )
    assert _error("broken/ssv2_test.json", **labels) == (
        "broken/ssv2_test.json: entry 0 (id 1420): no template (unlabelled, like the test split)"
    )
    assert _error("broken/ssv2_unknown_template.json", **labels) == (
        "broken/ssv2_unknown_template.json: entry 1 (id 1234): template "
        "'Spinning [something] so it continues spinning' -> "
        "'Spinning something so it continues spinning' is not in ssv2/labels.json"
    )
    assert _error("broken/ssv2_bad.json", **labels) == (
        "broken/ssv2_bad.json:3:1: invalid JSON: Expecting ',' delimiter"
    )
    assert _error("ssv2/train.json", format="ssv2_json", label_map="broken/labels_gap.json") == (
        "broken/labels_gap.json: indices must be 0..2; missing 2 (max 3)"
    )


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"id": "1"}, ": expected a JSON list of entries, got dict"),
        ([], ": no entries"),
        ([["1", "x"]], ": entry 0: expected an object with 'id' and 'template', got ['1', 'x']"),
        ([{"template": "Pushing [something] from left to right"}], ": entry 0: 'id' must be"),
        ([{"id": "7", "template": 3}], ": entry 0 (id 7): template must be a string, got 3"),
        (
            [{"id": 7, "template": "Approaching [something] with your camera"}] * 2,
            ": entry 1 (id 7): duplicate video id '7' (first at entry 0)",
        ),
    ],
)
def test_ssv2_entry_errors(tmp_path: Path, entries: object, expected: str) -> None:
    path = _write(tmp_path / "train.json", json.dumps(entries))
    message = _error(path, format="ssv2_json", label_map="ssv2/labels.json")
    assert message.startswith(f"{path}{expected}")


# --- official EVL list --------------------------------------------------------------------


def test_evl_list_relative_to_the_list_file() -> None:
    ann = read_annotations("evl/train.txt", format="evl_list")
    e = FIXTURES / "evl"
    assert ann.class_names == ("0", "1", "2")
    assert _rows(ann) == [
        (
            "train/abseiling/--07WQ2iBlw_000001_000011",
            e / "train/abseiling/--07WQ2iBlw_000001_000011.mp4",
            0,
        ),
        (
            "train/air drumming/-VtLx-mcPds_000014_000024",
            e / "train/air drumming/-VtLx-mcPds_000014_000024.mp4",
            1,
        ),
        (
            "/datasets/k400/train/zumba/2aQbhqTlYf8_000042_000052",
            Path("/datasets/k400/train/zumba/2aQbhqTlYf8_000042_000052.mp4"),
            2,
        ),
        (
            "train/abseiling/-3B32lodo2M_000059_000069",
            e / "train/abseiling/-3B32lodo2M_000059_000069.mp4",
            0,
        ),
    ]


def test_evl_list_with_root_and_label_map(tmp_path: Path) -> None:
    ann = read_annotations(
        "evl/train.txt", format="evl_list", root=tmp_path, label_map="evl/labels.json"
    )
    assert ann.class_names == ("abseiling", "air drumming", "zumba")
    assert [r.path for r in ann.records] == [
        tmp_path / "train/abseiling/--07WQ2iBlw_000001_000011.mp4",
        tmp_path / "train/air drumming/-VtLx-mcPds_000014_000024.mp4",
        Path("/datasets/k400/train/zumba/2aQbhqTlYf8_000042_000052.mp4"),
        tmp_path / "train/abseiling/-3B32lodo2M_000059_000069.mp4",
    ]


def test_evl_list_errors(tmp_path: Path) -> None:
    assert _error("broken/evl_bad_label.txt", format="evl_list") == (
        "broken/evl_bad_label.txt:2: label 'zumba' is not a non-negative integer"
    )
    assert _error("broken/evl_bad_line.txt", format="evl_list") == (
        "broken/evl_bad_line.txt:2: expected '<path> <label>', "
        "got 'train/air_drumming/-VtLx-mcPds_000014_000024.mp4'"
    )
    assert _error("evl/train.txt", format="evl_list", class_names=["a", "b"]) == (
        "evl/train.txt:4: label 2 is out of range for the 2 classes of the given class_names"
    )
    path = _write(tmp_path / "list.txt", "a/x.mp4 0\na/x.avi 1\n")
    assert _error(path, format="evl_list") == (
        f"{path}:2: duplicate video id 'a/x' (first on line 1)"
    )


# --- files and label maps -----------------------------------------------------------------


@pytest.mark.parametrize("format", sorted(get_args(AnnotationFormat)))
def test_missing_and_empty_files(tmp_path: Path, format: str) -> None:
    kwargs = {"format": format, "label_map": "ssv2/labels.json"}
    missing = tmp_path / "nope.txt"
    assert _error(missing, **kwargs) == f"{missing}: file not found"
    empty = _write(tmp_path / "empty.txt", "\n  \n")
    assert _error(empty, **kwargs) == f"{empty}: empty file"


def test_label_map_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out" / "labels.json"
    save_label_map(K400_TRAIN_CLASSES, path)
    assert read_label_map(path) == K400_TRAIN_CLASSES
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "abseiling": 0,\n  "air drumming": 1,\n') and text.endswith("}\n")
    save_label_map(K400_TRAIN_CLASSES, path)
    assert path.read_text(encoding="utf-8") == text


def test_label_map_indices_order_and_string_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "labels.json", '{"c": "2", "a": 0, "b": "1"}')
    assert read_label_map(path) == ("a", "b", "c")
    assert read_label_map("ssv2/labels.json") == SSV2_CLASSES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": "0", "b": "2"}', ": indices must be 0..1; missing 1 (max 2)"),
        ('{"a": 1, "b": 2}', ": indices must be 0..1; missing 0 (max 2)"),
        ('{"a": 0, "b": 0}', ": 'a' and 'b' share index 0"),
        ('{"a": 0, "a": 1}', ": duplicate class name 'a'"),
        ('{"a": "zero"}', ": index of 'a' must be an int or a decimal string, got 'zero'"),
        ('{"a": -1}', ": index of 'a' must be an int or a decimal string, got -1"),
        ('{"a": true}', ": index of 'a' must be an int or a decimal string, got True"),
        ('["a", "b"]', ": expected a JSON object {class name: index}, got ['a', 'b']"),
        ("{}", ": empty label map"),
        ('{"a": 0,}', ":1:9: invalid JSON: Expecting property name enclosed in double quotes"),
    ],
)
def test_bad_label_maps(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path / "labels.json", text)
    with pytest.raises(AnnotationError) as info:
        read_label_map(path)
    assert str(info.value) == f"{path}{expected}"


def test_save_label_map_rejects_duplicates(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="class names must be non-empty and unique"):
        save_label_map(["a", "b", "a"], tmp_path / "labels.json")
