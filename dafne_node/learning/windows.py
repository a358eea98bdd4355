"""Training windows: when hospital IT lets the node train, as cron expressions with a zone.

A window opens at each time its cron expression fires (APScheduler's ``CronTrigger``, in
the window's time zone, so "01:00 Europe/Rome" stays 01:00 across daylight saving) and
stays open for at most ``max_duration_h``. The scheduler asks one question on every tick,
"which window is open *now*?", instead of queueing a run per firing: a window missed while
the node was down does not pile up runs, and a node that starts inside a window trains in
what is left of it. Everything takes the current time as an argument, so tests drive the
clock instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["OpenWindow", "TrainingWindow", "next_opening", "open_window"]


class TrainingWindow(BaseModel):
    """One recurring training window, as written in the node's TOML file.

    Example: ``{ name = "nightly", cron = "0 1 * * *", timezone = "Europe/Rome",
    max_duration_h = 4 }`` trains every night from 01:00 to at most 05:00, Rome time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "nightly"
    cron: str = "0 1 * * *"
    """Minute, hour, day of month, month, day of week (standard five-field crontab)."""
    timezone: str = "UTC"
    """An IANA zone name (``Europe/Rome``); the cron expression is read in it."""
    max_duration_h: float = Field(default=4.0, gt=0, le=168)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as "
                             "'Europe/Rome')") from None
        return value

    @model_validator(mode="after")
    def _valid_cron(self) -> TrainingWindow:
        try:
            CronTrigger.from_crontab(self.cron, timezone=self.timezone)
        except ValueError as exc:
            raise ValueError(f"cron {self.cron!r} is not a crontab expression: {exc}") from None
        return self

    @cached_property
    def trigger(self) -> CronTrigger:
        """The APScheduler trigger that says when the window opens."""
        return CronTrigger.from_crontab(self.cron, timezone=self.timezone)

    @property
    def duration(self) -> timedelta:
        """How long the window stays open."""
        return timedelta(hours=self.max_duration_h)


@dataclass(frozen=True)
class OpenWindow:
    """A window that is open now: when it opened and when training must have stopped (UTC)."""

    name: str
    opened_at: datetime
    closes_at: datetime


def open_window(windows: Sequence[TrainingWindow], now: datetime) -> OpenWindow | None:
    """The window open at ``now`` (the one closing last, if they overlap), or None.

    Raises
    ------
    ValueError
        If ``now`` is naive.
    """
    _check_aware(now)
    best: OpenWindow | None = None
    for window in windows:
        opened = _last_opening(window, now)
        if opened is None:
            continue
        opened = opened.astimezone(UTC)
        candidate = OpenWindow(window.name, opened, opened + window.duration)
        if best is None or candidate.closes_at > best.closes_at:
            best = candidate
    return best


def next_opening(windows: Sequence[TrainingWindow], now: datetime) -> OpenWindow | None:
    """The next window to open strictly after ``now``, or None if none ever will."""
    _check_aware(now)
    upcoming = []
    for window in windows:
        fire = window.trigger.get_next_fire_time(None, now + timedelta(seconds=1))
        if fire is not None:
            fire = fire.astimezone(UTC)
            upcoming.append(OpenWindow(window.name, fire, fire + window.duration))
    return min(upcoming, key=lambda item: item.opened_at, default=None)


def _last_opening(window: TrainingWindow, now: datetime) -> datetime | None:
    """The latest time ``window`` opened that is at most its duration before ``now``."""
    fire = window.trigger.get_next_fire_time(None, now - window.duration)
    latest = None
    while fire is not None and fire <= now:
        if now < fire + window.duration:
            latest = fire
        fire = window.trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    return latest


def _check_aware(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("the time must be timezone-aware")
