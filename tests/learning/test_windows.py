"""Training windows on a controlled clock: open, closed, time zones, overlaps, bad settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from dafne_node.learning.windows import TrainingWindow, next_opening, open_window

NIGHTLY = TrainingWindow(name="nightly", cron="0 1 * * *", timezone="Europe/Rome",
                         max_duration_h=4)


def rome(day: int, hour: int, minute: int = 0, month: int = 12) -> datetime:
    """A Rome wall-clock time as UTC (CET is UTC+1 in winter, CEST UTC+2 in summer)."""
    offset = 2 if 4 <= month <= 9 else 1
    return datetime(2026, month, day, hour, minute, tzinfo=UTC) - timedelta(hours=offset)


def test_open_from_the_cron_time_for_its_duration_in_its_zone() -> None:
    assert open_window([NIGHTLY], rome(4, 0, 59)) is None
    window = open_window([NIGHTLY], rome(4, 1, 0))
    assert window is not None and window.name == "nightly"
    assert (window.opened_at, window.closes_at) == (rome(4, 1), rome(4, 5))
    assert open_window([NIGHTLY], rome(4, 4, 59)) == window
    assert open_window([NIGHTLY], rome(4, 5, 0)) is None


def test_a_node_started_inside_a_window_gets_what_is_left_of_it() -> None:
    now = rome(4, 3, 30)
    window = open_window([NIGHTLY], now)
    assert window is not None and window.closes_at - now == timedelta(hours=1, minutes=30)


def test_missed_windows_do_not_pile_up() -> None:
    """Three nights down: at 12:00 no window is open, and only one opens next."""
    assert open_window([NIGHTLY], rome(7, 12)) is None
    upcoming = next_opening([NIGHTLY], rome(7, 12))
    assert upcoming is not None and upcoming.opened_at == rome(8, 1)


def test_the_zone_keeps_wall_clock_time_across_daylight_saving() -> None:
    summer = open_window([NIGHTLY], rome(15, 2, month=7))
    winter = open_window([NIGHTLY], rome(15, 2, month=1))
    assert summer is not None and summer.opened_at.hour == 23  # 01:00 CEST = 23:00 UTC
    assert winter is not None and winter.opened_at.hour == 0  # 01:00 CET = 00:00 UTC


def test_overlapping_windows_give_the_one_that_closes_last() -> None:
    weekend = TrainingWindow(name="weekend", cron="0 0 * * sat", timezone="Europe/Rome",
                             max_duration_h=30)
    saturday = rome(5, 2)  # 2026-12-05 is a Saturday
    window = open_window([NIGHTLY, weekend], saturday)
    assert window is not None and window.name == "weekend"
    assert window.closes_at == rome(6, 6)


def test_next_opening_is_strictly_after_now() -> None:
    upcoming = next_opening([NIGHTLY], rome(4, 1))
    assert upcoming is not None and upcoming.opened_at == rome(5, 1)


@pytest.mark.parametrize(("fields", "message"), [
    ({"cron": "61 1 * * *"}, "cron '61 1 \\* \\* \\*' is not a crontab expression"),
    ({"cron": "0 1 * *"}, "Wrong number of fields"),
    ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ({"max_duration_h": 0}, "greater than 0"),
])
def test_bad_windows_are_refused_naming_what_is_wrong(fields: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainingWindow(**fields)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        open_window([NIGHTLY], datetime(2026, 12, 4, 1))
