import pytest

from benchmarks import _harness


@pytest.fixture(scope="session")
def device():
    return _harness.bench_device()


def pytest_sessionfinish(session, exitstatus):
    if not _harness.RECORDS:
        return
    path = _harness.write_results(_harness.bench_device())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = _harness.summary_lines(_harness.RECORDS) + [f"results written to {path}"]
    if reporter is not None:
        reporter.write_sep("=", "fastser benchmark summary (ratios from this run)")
        for line in lines:
            reporter.write_line(line)
    else:  # pragma: no cover
        print("\n".join(lines))
