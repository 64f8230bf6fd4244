"""The report as data: what :func:`~evl_platform.report.build.build_report` assembles and the
page writers (:mod:`evl_platform.report.page`) turn into files. Both import it; neither
imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass, field

from evl_platform.report.tables import ReportTable


@dataclass
class Report:
    """Everything the report shows, before it is written."""

    profile: str
    header: dict[str, str]
    tables: list[ReportTable]
    findings: list[str]
    missing: list[str]
    figures: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # file -> (caption, png)

    @property
    def measured(self) -> int:
        return sum(t.measured for t in self.tables)

    def table(self, table_id: str) -> ReportTable | None:
        return next((t for t in self.tables if t.id == table_id), None)
