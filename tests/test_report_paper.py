"""The paper's reference numbers: ids, every cell checked against the paper text, the loader.

Each table row is matched to the line of ``tests/fixtures/evl_paper.txt`` that prints it (the
OCR'd paper). Numbers are formatted as the paper prints them (``11,940``, ``28.70``, ``+1.6``)
and must appear among the line's numeric tokens in row order and in column order, so a wrong,
swapped or misplaced number fails.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from evl_platform.report.paper import (
    PaperTable,
    PaperTableError,
    load_paper_tables,
    paper_table,
    paper_tables,
)

PAPER = (Path(__file__).parent / "fixtures" / "evl_paper.txt").read_text(encoding="utf-8")

EXPECTED_ROWS: dict[str, list[str]] = {
    "1": ["uniformer_b", "swin_b", "ircsn_152", "mvit_s", "omnivore_b", "vivit_l_fe",
          "tokenlearner_8at18", "mvit_l", "mtv_l", "8", "16", "32", "ViT-L/14 8",
          "ViT-L/14 16", "ViT-L/14 32", "ViT-L/14 336px 32"],
    "2": ["efficient_prompting_a5", "actionclip 8x1", "actionclip 16x1", "actionclip 32x1",
          "actionclip 16x3", "actionclip 32x3", "evl 1 layer 8x3", "evl 4 layers 8x3",
          "evl 4 layers 32x3"],
    "3": ["uniformer_b32", "evl_vitb16_8"],
    "4": ["uniformer_b32", "timesformer_8", "actionclip_16", "evl_vitb16_8"],
    "5": ["frozen_gap", "open_gap", "frozen_evl", "open_evl"],
    "6a": ["1", "2", "3", "4", "5"],
    "6b": ["-4,-3,-2,-1", "-2,-2,-1,-1", "-1,-1,-1,-1", "-2,-1,-2,-1", "-7,-5,-3,-1"],
    "6c": ["temporal only (cls token)", "temporal only (avg)", "spatial only (avg)",
           "spatiotemporal"],
    "7": ["timesformer_sonly_in21k", "timesformer_jointst_in21k", "timesformer_dividedst_in21k",
          "evl_in21k", "timesformer_dividedst_clip", "frozen", "actionclip_16", "evl_16",
          "actionclip_32", "evl_32"],
    "8a": ["- - -", "T-Conv", "T-PE", "T-CA", "T-Conv T-PE", "T-Conv T-CA", "T-PE T-CA",
           "T-Conv T-PE T-CA"],
    "8b": ["4", "6", "8", "10", "12"],
    "9": ["8", "16", "32", "ViT-L/14 8", "ViT-L/14 32", "ViT-L/14 336px 32", "ensemble"],
    "10": ["uniformer_b16 + uniformer_b32", "uniformer_b16 + swin_b", "uniformer_b16 + evl",
           "swin_b + uniformer_b32", "swin_b + evl", "uniformer_b32 + swin_b",
           "uniformer_b32 + evl"],
    "11": ["uniformer_b32 + timesformer_l", "uniformer_b32 + evl"],
}  # fmt: skip


@dataclass(frozen=True)
class Where:
    """Where a table's rows are printed in the paper text.

    Attributes:
        caption: start of the caption line (``Table 6:``); the table follows it.
        header: start of the table's header line; its data lines follow, up to a blank line.
        lines: data line index of each row; ``None``: one line per row, in order.
        fields: tab-separated fields of the line holding this (sub-)table's columns.
    """

    caption: str
    header: str
    lines: tuple[int, ...] | None = None
    fields: tuple[int | None, int | None] = (None, None)


WHERE: dict[str, Where] = {
    "1": Where("Table 1:", "Method\tPretraining"),
    "2": Where("Table 2:", "Method\tNew Params", lines=(0, 1, 1, 1, 1, 1, 2, 2, 2)),
    "3": Where("Table 3:", "Model (# frames)", lines=(0, 0)),
    "4": Where("Table 4:", "Method (#Frames"),
    "5": Where("Table 5:", "Backbone\tHead"),
    "6a": Where("Table 6:", "Depth\t", fields=(0, 2)),
    "6b": Where("Table 6:", "Depth\t", fields=(2, 4)),
    "6c": Where("Table 6:", "Depth\t", fields=(4, 7)),
    "7": Where("Table 7:", "Model\tPretraining"),
    "8a": Where("Table 8:", "T-Conv\tT-PE", fields=(0, 5)),
    "8b": Where("Table 8:", "T-Conv\tT-PE", fields=(5, 7)),
    "9": Where("Table 9:", "Method\tSSv2"),
    "10": Where("Table 10:", "Model 1\tAcc. 1", lines=(0, 0, 0, 1, 1, 2, 2)),
    "11": Where("Table 11:", "Model 1\tAcc. 1", lines=(0, 0)),
}

FORMATS = {
    "K-400": "{:.1f}", "SSv2": "{:.1f}", "gflops": "{:,.0f}", "new_params_m": "{:.2f}",
    "latency_ms": "{:.2f}", "throughput_vps": "{:.2f}", "views": "{:.0f}", "gpu_hours": "{:.0f}",
    "max_batch": "{:.0f}", "step_time_s": "{:.2f}", "acc1_a": "{:.1f}", "acc1_b": "{:.1f}",
    "acc1_ensemble": "{:.1f}", "gain": "{:+.1f}",
}  # fmt: skip
FORMAT_OVERRIDES = {("3", "gflops"): "{:.0f}"}  # Table 3 prints 1036, not 1,036

_NUMBER = re.compile(r"(?<![\w.])[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\.?\w)|\binf\b")
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathbf|overline)\{([^}]*)\}")
_CITATION = re.compile(r" ?\[\d+\]")


def _normalise(text: str) -> str:
    """Undo the paper text's LaTeX residue: ``$11,\\!940$`` -> ``11,940``, no citations."""
    text = _LATEX_WRAPPER.sub(r"\1", text)
    for old, new in (("$", ""), ("\\!", ""), ("\\\\", " "), ("\\times", "×"), (" imes ", "×")):
        text = text.replace(old, new)
    return _CITATION.sub("", text)


def _tokens(text: str) -> list[str]:
    return _NUMBER.findall(_normalise(text))


def _is_subsequence(wanted: list[str], tokens: list[str]) -> bool:
    remaining = iter(tokens)
    return all(any(token == item for token in remaining) for item in wanted)


def _data_lines(where: Where) -> list[str]:
    lines = PAPER.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(where.caption))
    header = next(i for i in range(start, len(lines)) if lines[i].startswith(where.header))
    end = next(i for i in range(header + 1, len(lines)) if not lines[i].strip())
    return lines[header + 1 : end]


def _paper_fields(table_id: str, row_index: int) -> list[str]:
    """The tab-separated fields of the paper line printing a row (this sub-table's only)."""
    where = WHERE[table_id]
    lines = _data_lines(where)
    line = lines[row_index if where.lines is None else where.lines[row_index]]
    return line.split("\t")[slice(*where.fields)]


def _paper_line(table_id: str, row_index: int) -> str:
    return "\t".join(_paper_fields(table_id, row_index))


def _printed(table_id: str, column_id: str, value: float | None) -> str:
    """``value`` as the paper prints it; it must read back exactly (``444.1`` is no ``444``)."""
    assert value is not None, (table_id, column_id)
    if math.isinf(value):
        return "inf"
    printed = FORMAT_OVERRIDES.get((table_id, column_id), FORMATS[column_id]).format(value)
    assert float(printed.replace(",", "")) == value, (table_id, column_id, value, printed)
    return printed


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", _normalise(text))


def test_tables_in_paper_order_with_expected_rows() -> None:
    tables = paper_tables()
    assert list(tables) == list(EXPECTED_ROWS)
    for table_id, row_ids in EXPECTED_ROWS.items():
        assert [row.id for row in tables[table_id].rows] == row_ids, table_id
        assert tables[table_id].id == table_id


@pytest.mark.parametrize("table_id", list(EXPECTED_ROWS))
def test_table_shape(table_id: str) -> None:
    table = paper_table(table_id)
    assert table.title.startswith(f"Table {table_id}: ")
    assert table.caption and table.columns
    for row in table.rows:
        assert list(row.values) == [column.id for column in table.columns]
        assert list(row.info) == [column.id for column in table.info_columns]
    for dataset in ("K-400", "SSv2"):
        if any(column.id == dataset for column in table.columns):
            assert table.dataset in (dataset, None)
            assert next(c for c in table.columns if c.id == dataset).label == f"{dataset} Acc. (%)"


@pytest.mark.parametrize("table_id", list(EXPECTED_ROWS))
def test_every_cell_is_printed_on_its_paper_line(table_id: str) -> None:
    table = paper_table(table_id)
    groups: dict[str, list[int]] = {}
    for index in range(len(table.rows)):
        groups.setdefault(_paper_line(table_id, index), []).append(index)
    for line, indices in groups.items():
        tokens = _tokens(line)
        for index in indices:  # each row's numbers, in column order
            row = table.rows[index]
            printed = [_printed(table_id, c, v) for c, v in row.values.items()]
            assert _is_subsequence(printed, tokens), (table_id, row.id, printed, line)
        for column in table.columns:  # each column's numbers, in row order
            printed = [
                _printed(table_id, column.id, table.rows[i].values[column.id]) for i in indices
            ]
            once = printed[:1] if len(set(printed)) == 1 else printed  # 105.15 printed once
            assert _is_subsequence(once, tokens), (table_id, column.id, printed, line)


INFO_CHECKED = {
    "1": ("frames",), "2": ("method", "frames"), "3": ("model",),
    "4": ("method", "pretraining", "gpu"), "5": ("backbone", "head"),
    "6c": ("feature_shape", "reduction"), "7": ("model", "pretraining"),
    "9": ("method", "frames"), "10": ("model_a", "model_b"), "11": ("model_a", "model_b"),
}  # fmt: skip


@pytest.mark.parametrize("table_id", list(INFO_CHECKED))
def test_info_text_is_printed_on_its_paper_line(table_id: str) -> None:
    for index, row in enumerate(paper_table(table_id).rows):
        line = _squash(_paper_line(table_id, index))
        for column_id in INFO_CHECKED[table_id]:
            assert _squash(row.info[column_id]) in line, (table_id, row.id, column_id)


def test_table_1_methods_and_pretraining_match_the_paper() -> None:
    rows = paper_table("1").rows
    for index, row in enumerate(rows[:9]):
        line = _squash(_paper_line("1", index))
        assert _squash(row.info["method"]) in line and _squash(row.info["pretraining"]) in line
    # The OCR scrambles the EVL rows: names and "CLIP" (read as CLID/OLIP) float between lines.
    evl_block = _squash(" ".join(_data_lines(WHERE["1"])[9:]))
    assert "(Ours)CLIP" in evl_block and "OLIP" in evl_block
    for row in rows[9:]:
        assert row.info["pretraining"] == "CLIP", row.id
        assert _squash(row.info["method"]).lower() in evl_block.lower(), row.id


def test_sub_table_row_ids_match_the_paper() -> None:
    for table_id in ("6a", "8b"):
        for index, row in enumerate(paper_table(table_id).rows):
            assert _paper_fields(table_id, index)[0] == row.id == row.info["depth"]
    for index, row in enumerate(paper_table("6b").rows):
        printed = _normalise(_paper_fields("6b", index)[0])
        assert printed == row.info["feature_layers"] == f"[{row.id.replace(',', ', ')}]"


MARKS = {"7": {"no": {"×", "X"}, "yes": {"1", "\\checkmark", "<i>✓</i>"}},
         "8a": {"no": {"X", "Х"}, "yes": {"1", "~"}}}  # fmt: skip


def test_check_marks_match_the_paper() -> None:
    for index, row in enumerate(paper_table("7").rows):
        assert _paper_fields("7", index)[2] in MARKS["7"][row.info["frozen"]], row.id
    for index, row in enumerate(paper_table("8a").rows):
        marks = _paper_fields("8a", index)[:3]
        for mark, column in zip(marks, ("t_conv", "t_pe", "t_ca"), strict=True):
            assert mark in MARKS["8a"][row.info[column]], (row.id, column)
        columns = paper_table("8a").info_columns
        on = [c.label for c, m in zip(columns, marks, strict=True) if m in MARKS["8a"]["yes"]]
        assert row.id == (" ".join(on) or "- - -")


SAMPLES = [  # (table, row, column, as the paper prints it)
    ("1", "vivit_l_fe", "gflops", "11,940"),
    ("1", "ViT-L/14 336px 32", "gflops", "18,196"),
    ("1", "mtv_l", "gflops", "18,050"),
    ("1", "32", "K-400", "84.2"),
    ("1", "ViT-L/14 16", "K-400", "87.0"),
    ("2", "efficient_prompting_a5", "new_params_m", "9.43"),
    ("2", "actionclip 32x3", "K-400", "83.8"),
    ("2", "evl 4 layers 8x3", "new_params_m", "28.70"),
    ("3", "uniformer_b32", "latency_ms", "314.58"),
    ("3", "evl_vitb16_8", "gflops", "454"),
    ("3", "evl_vitb16_8", "throughput_vps", "25.53"),
    ("4", "uniformer_b32", "gpu_hours", "5000"),
    ("4", "actionclip_16", "gpu_hours", "480"),
    ("4", "evl_vitb16_8", "gpu_hours", "60"),
    ("4", "timesformer_8", "K-400", "82.0"),
    ("5", "frozen_gap", "max_batch", "inf"),
    ("5", "open_evl", "step_time_s", "4.41"),
    ("6a", "1", "K-400", "81.1"),
    ("6a", "5", "K-400", "83.0"),
    ("6b", "-1,-1,-1,-1", "K-400", "82.1"),
    ("6b", "-7,-5,-3,-1", "K-400", "82.0"),
    ("6c", "temporal only (cls token)", "K-400", "79.8"),
    ("6c", "spatial only (avg)", "K-400", "80.1"),
    ("7", "evl_in21k", "K-400", "75.4"),
    ("7", "frozen", "K-400", "82.9"),
    ("8a", "- - -", "K-400", "82.5"),
    ("8a", "- - -", "SSv2", "47.2"),
    ("8a", "T-Conv", "SSv2", "57.1"),
    ("8a", "T-PE T-CA", "K-400", "82.7"),
    ("8a", "T-PE T-CA", "SSv2", "60.7"),
    ("8a", "T-Conv T-PE T-CA", "SSv2", "61.0"),
    ("8b", "4", "SSv2", "58.6"),
    ("8b", "12", "SSv2", "61.0"),
    ("9", "ViT-L/14 336px 32", "gflops", "24,259"),
    ("9", "ensemble", "SSv2", "72.1"),
    ("10", "uniformer_b16 + evl", "gain", "+2.5"),
    ("10", "uniformer_b32 + swin_b", "gain", "+1.8"),
    ("10", "swin_b + evl", "acc1_ensemble", "85.0"),
    ("11", "uniformer_b32 + timesformer_l", "gain", "+0.2"),
    ("11", "uniformer_b32 + evl", "gain", "+0.9"),
]


@pytest.mark.parametrize(("table_id", "row_id", "column_id", "printed"), SAMPLES)
def test_sampled_cell_matches_the_paper(
    table_id: str, row_id: str, column_id: str, printed: str
) -> None:
    table = paper_table(table_id)
    value = table.value(row_id, column_id)
    assert value == float(printed.replace(",", "")), (table_id, row_id, column_id)
    index = [row.id for row in table.rows].index(row_id)
    assert printed in _tokens(_paper_line(table_id, index))


def test_ensemble_pairs_are_printed_together_and_gain_is_over_model_1() -> None:
    for table_id in ("10", "11"):
        for index, row in enumerate(paper_table(table_id).rows):
            v = row.values
            pair = f"{v['acc1_ensemble']:.1f} ({v['gain']:+.1f})"
            assert pair in _normalise(_paper_line(table_id, index)), (table_id, row.id)
            assert v["gain"] == pytest.approx(v["acc1_ensemble"] - v["acc1_a"]), row.id


def test_ensemble_models_have_one_accuracy_per_table() -> None:
    for table_id in ("10", "11"):
        accuracy: dict[str, float | None] = {}
        for row in paper_table(table_id).rows:
            for side in ("a", "b"):
                model = row.info[f"model_{side}"]
                value = row.values[f"acc1_{side}"]
                assert accuracy.setdefault(model, value) == value, (table_id, row.id, model)


def test_exact_values() -> None:
    assert paper_table("8a").value("- - -", "SSv2") == 47.2
    assert paper_table("8a").value("T-Conv T-PE T-CA", "SSv2") == 61.0
    assert math.isinf(paper_table("5").value("frozen_gap", "max_batch"))
    assert paper_table("1").value("vivit_l_fe", "gflops") == 11940
    assert paper_table("4").row("actionclip_16").info["gpu"] == "RTX3090"
    default_model = [("1", "8"), ("2", "evl 4 layers 8x3"), ("3", "evl_vitb16_8"),
                     ("4", "evl_vitb16_8"), ("6a", "4"), ("6b", "-4,-3,-2,-1"),
                     ("6c", "spatiotemporal"), ("7", "frozen")]  # fmt: skip
    assert {paper_table(t).value(r, "K-400") for t, r in default_model} == {82.9}


def test_lookups() -> None:
    table = paper_table("8a")
    assert isinstance(table, PaperTable) and table.dataset is None
    assert table.row("no such row") is None and table.value("no such row", "SSv2") is None
    with pytest.raises(KeyError, match="gflops"):
        table.value("T-PE", "gflops")
    with pytest.raises(KeyError, match="known: 1, 2, 3, 4, 5, 6a, 6b, 6c, 7, 8a, 8b, 9, 10, 11"):
        paper_table("12")
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.note = "changed"  # type: ignore[misc]
    paper_tables().clear()
    assert len(paper_tables()) == len(EXPECTED_ROWS)


def test_packaged_yaml_loads_through_the_path_loader() -> None:
    path = Path(str(resources.files("evl_platform.report").joinpath("paper_tables.yaml")))
    assert load_paper_tables(path) == paper_tables()


_ROW = {"id": "r1", "label": "Row 1", "info": {"method": "M"}, "values": {"K-400": 80.0}}


def _good_doc() -> dict[str, Any]:
    table = {
        "id": "T", "title": "Table T: test", "caption": "A test.", "kind": "accuracy",
        "dataset": "K-400", "info_columns": [{"id": "method", "label": "Method"}],
        "columns": [{"id": "K-400", "label": "K-400 Acc. (%)"}], "note": "", "rows": [_ROW],
    }  # fmt: skip
    return copy.deepcopy({"tables": [table]})


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("rows", 0, "colour"), "red", r"table 'T', row 'r1'.*colour"),
        (("rows", 0, "values", "SSv2"), 50.0, r"table 'T', row 'r1'.*undeclared column.*SSv2"),
        (("rows",), [_ROW, _ROW], r"table 'T'.*duplicate row id 'r1'"),
        (("rows", 0, "values", "K-400"), "80.0", r"table 'T', row 'r1'.*K-400.*valid number"),
        (("rows", 0, "values"), {}, r"table 'T', row 'r1'.*no value for column.*K-400"),
        (("rows", 0, "values", "K-400"), math.nan, r"table 'T', row 'r1'.*NaN"),
        (("rows", 0, "info"), {"methd": "M"}, r"table 'T', row 'r1'.*undeclared.*methd"),
        (("subtitle",), "x", r"table 'T'.*subtitle"),
        (("kind",), "accuracies", r"table 'T'.*kind"),
    ],
)
def test_loader_rejects_bad_yaml(
    tmp_path: Path, path: tuple[str | int, ...], value: Any, message: str
) -> None:
    file = tmp_path / "tables.yaml"
    file.write_text(yaml.safe_dump(_good_doc()), encoding="utf-8")
    assert list(load_paper_tables(file)) == ["T"]
    doc = _good_doc()
    parent = doc["tables"][0]
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    file.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(PaperTableError, match=message):
        load_paper_tables(file)
