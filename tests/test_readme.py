"""The README's results tables are generated from benchmarks/results/, never typed by hand."""
from pathlib import Path

from benchmarks import report

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def between(start: str, end: str) -> str:
    return README.split(start, 1)[1].split(end, 1)[0]


def test_performance_table_is_the_generated_one():
    assert between(report.START, report.END) == "\n" + report.table()


def test_accuracy_table_is_the_generated_one():
    assert between(report.ACC_START, report.ACC_END) == "\n" + report.accuracy_table()
