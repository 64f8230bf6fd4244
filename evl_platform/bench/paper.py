"""The paper's figures the benchmarks print beside their own, read from the paper tables
(:mod:`evl_platform.report.paper`): Table 3 for ``bench infer``, Table 5 for ``bench step``."""

from __future__ import annotations

import math

from evl_platform.report.paper import paper_table

INFER_TABLE, INFER_ROW = "3", "evl_vitb16_8"  # EVL ViT-B/16, 8 frames x 3 views, V100-32G, AMP
STEP_TABLE = "5"  # V100-16G, 64 samples, 4 decoder layers; rows frozen_gap ... open_evl
INFER_COLUMNS = {  # bench infer's field -> Table 3 column
    "gflops_per_video": "gflops",
    "latency_ms": "latency_ms",
    "throughput_videos_per_s": "throughput_vps",
}


def paper_infer() -> dict[str, float]:
    """EVL ViT-B/16's GFLOPs per video, latency (ms) and throughput (videos/s) in Table 3."""
    table = paper_table(INFER_TABLE)
    return {field: table.value(INFER_ROW, column) for field, column in INFER_COLUMNS.items()}


def paper_step(backbone: str, head: str) -> tuple[str, float]:
    """The largest batch (as printed: ``inf.``, ``8``) and the step time in seconds that
    Table 5 gives a ``frozen``/``open`` backbone under a ``gap``/``evl`` head."""
    row = paper_table(STEP_TABLE).row(f"{backbone}_{head}")
    batch = row.values["max_batch"]
    return ("inf." if math.isinf(batch) else f"{batch:g}"), row.values["step_time_s"]


def paper_ratio(head: str) -> float:
    """Table 5's open over frozen step time under ``head``."""
    return paper_step("open", head)[1] / paper_step("frozen", head)[1]
