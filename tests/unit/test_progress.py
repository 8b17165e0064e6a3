"""flood-copy's progress line: it fits the terminal, whole words only, the bar going first."""

from __future__ import annotations

import pytest

from flood.commands.copy import Progress, Tally, fit

FIELDS = ["1000/1000 files", "1023.9 MiB/1023.9 MiB", "1023.9 MiB/s", "0:00:00 left"]


@pytest.mark.parametrize("columns", [20, 40, 60, 72, 80, 100, 200])
def test_the_line_fits_the_terminal_in_whole_words(columns: int) -> None:
    """At every width the line leaves the last column free and ends with a whole field."""
    line = fit(FIELDS, 0.5, columns - 1)
    assert len(line) <= columns - 1
    assert line.endswith(("left", "files", "files"[: columns - 1]))
    if columns >= 80:
        assert line.endswith("0:00:00 left")


def test_the_bar_narrows_then_goes_then_the_rate() -> None:
    """80 columns: every field with a narrower bar; 60: no bar, no rate; 40: no bytes."""
    assert fit(FIELDS, 1.0, 79) == f"[{'#' * 10}] " + "  ".join(FIELDS)
    assert fit(FIELDS, 1.0, 59) == "1000/1000 files  1023.9 MiB/1023.9 MiB  0:00:00 left"
    assert fit(FIELDS, 1.0, 39) == "1000/1000 files  0:00:00 left"
    assert fit(FIELDS, 1.0, 42) == "[##########] 1000/1000 files  0:00:00 left"
    assert fit(FIELDS, 0.0, 200) == f"[{' ' * 20}] " + "  ".join(FIELDS)


def test_progress_line_at_80_columns_says_left() -> None:
    """A big copy's line at 80 columns ends in 'left', not 'lef'."""
    progress = Progress(None, 1000, 1000 * 1024 * 1024 * 1024)
    progress.done_files, progress.done_bytes = 999, 999 * 1024**3
    line = progress.line(progress.started + 10, columns=80)
    assert len(line) <= 79 and line.endswith(" left"), line


def test_the_wait_tally_line_and_summary() -> None:
    """The --wait line counts uploaded, failed, waiting (retries among them) and held; the
    summary names the failed files."""
    tally = Tally(total=5, uploaded=2, failed=["s3://p/b/x (AccessDenied)"], waiting=1, held=1)
    tally.retrying = 1
    assert tally.line(65) == (
        "waiting for flood-supervisor: 2 uploaded, 1 failed, 1 waiting (1 for a retry), "
        "1 held  1:05"
    )
    assert tally.summary("s3://p/b/", 2.04, pending=2) == (
        "uploaded 2 of 5 files to s3://p/b/ in 2.0 s; 1 failed: s3://p/b/x (AccessDenied); "
        "2 not finished"
    )
