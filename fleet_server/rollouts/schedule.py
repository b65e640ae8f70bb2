"""A rollout's schedule: start not before a time, and maintenance windows (hawkBit's model: a cron
expression, a duration and a time zone) inside which stages start and devices activate.

Pure functions of a clock value: the controller, the status document and the tests pass `now`.

- Window starts are the cron expression's matches in the zone's *wall-clock* time, so `0 2 * * *`
  in Europe/Madrid is 02:00 local all year round (01:00 UTC in winter, 00:00 UTC in summer).
- A start that does not exist (the hour skipped in spring) is read with the offset before the
  change, as Python does (PEP 495, fold=0): 02:30 on the last Sunday of March opens at 03:30.
  A start that happens twice (the hour repeated in autumn) opens once, at its first occurrence.
- The duration is elapsed time: a 2 h window lasts 2 h on DST days too. A window may cross
  midnight (`0 23 * * *` for 3 h).
- Per-device windows (`device_windows`): a device's tag `maintenance_window` ("CRON; DURATION",
  e.g. `0 3 * * *; 90m`) gives its own window, in the zone of its tag `maintenance_tz` or the
  rollout's; a device with only `maintenance_tz` takes the rollout's window in its own zone.
  Devices are sent absolute UTC intervals (`activate_windows`), so agents need no cron library.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter


class ScheduleError(ValueError):
    """A schedule that cannot be accepted; the message says why. rollout_model turns it into a
    RolloutError, so this module needs nothing from the rollout model."""

    status = 400


WINDOW_TAG = "maintenance_window"  # a device's own window: "CRON; DURATION"
TZ_TAG = "maintenance_tz"  # the time zone of a device's window
DEVICE_WINDOWS_SENT = 7  # activation windows one desired state carries (republished when used up)
MAX_DURATION_S = 7 * 86400.0
LATEST_START = 4_102_444_800.0  # 2100-01-01T00:00:00Z
_MAX_STEPS = 2_000  # cron matches examined per question (a per-minute cron over a day is 1440)
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?"
                       r"\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


@dataclass(frozen=True)
class Window:
    """Recurring maintenance window: opens at each cron match (wall clock in `timezone`) for
    `duration_s` seconds."""

    cron: str
    duration_s: float
    timezone: str = "UTC"

    def intervals(self, start: float, end: float) -> list[tuple[float, float]]:
        """The windows (UTC epoch seconds, merged where they overlap) that intersect [start, end)."""
        tz = ZoneInfo(self.timezone)
        # Begin early enough to catch a window that opened before `start` and is still open; two
        # extra hours cover a DST shift between wall clock and elapsed time.
        first = datetime.fromtimestamp(start - self.duration_s - 7200, tz).replace(tzinfo=None)
        it = croniter(self.cron, first)
        out: list[tuple[float, float]] = []
        for _ in range(_MAX_STEPS):
            try:
                local = it.get_next(datetime)
            except CroniterError:  # no further match
                break
            opens = local.replace(tzinfo=tz, fold=0).timestamp()
            if opens >= end:
                break
            closes = opens + self.duration_s
            if closes <= start:
                continue
            if out and opens <= out[-1][1]:
                if out[-1][0] == opens:  # an autumn-repeated start: keep the first only
                    continue
                out[-1] = (out[-1][0], max(out[-1][1], closes))
            else:
                out.append((opens, closes))
        return out

    def current(self, now: float) -> tuple[float, float] | None:
        """The window open at `now` (UTC interval), or None."""
        for opens, closes in self.intervals(now, now + 1):
            if opens <= now < closes:
                return opens, closes
        return None

    def upcoming(self, now: float, count: int = 1, horizon_s: float = 400 * 86400.0) -> list[tuple[float, float]]:
        """The window open at `now` (if any) and the next ones, up to `count` (merged where they
        overlap), opening within `horizon_s`."""
        return list(_upcoming(self, now, count, horizon_s))

    def local_iso(self, ts: float) -> str:
        return datetime.fromtimestamp(ts, ZoneInfo(self.timezone)).isoformat(timespec="minutes")

    def to_dict(self) -> dict[str, Any]:
        return {"cron": self.cron, "duration_s": self.duration_s, "timezone": self.timezone}


@functools.lru_cache(maxsize=1024)  # a pass asks the same for every device sharing a window
def _upcoming(window: Window, now: float, count: int, horizon_s: float) -> tuple[tuple[float, float], ...]:
    tz = ZoneInfo(window.timezone)
    first = datetime.fromtimestamp(now - window.duration_s - 7200, tz).replace(tzinfo=None)
    it = croniter(window.cron, first)
    out: list[tuple[float, float]] = []
    for _ in range(_MAX_STEPS):
        try:
            opens = it.get_next(datetime).replace(tzinfo=tz, fold=0).timestamp()
        except CroniterError:  # no further match
            break
        closes = opens + window.duration_s
        if closes <= now:
            continue
        if out and opens <= out[-1][1]:  # overlapping (or an autumn-repeated start): merge
            out[-1] = (out[-1][0], max(out[-1][1], closes))
            continue
        if len(out) == count or opens > now + horizon_s:
            break
        out.append((opens, closes))
    return tuple(out)


@dataclass(frozen=True)
class Schedule:
    """When a rollout may act: not before `not_before`; stages start only inside `window`;
    with `device_windows`, each device activates only inside its own window."""

    not_before: float | None = None
    window: Window | None = None
    device_windows: bool = False

    def started(self, now: float) -> bool:
        return self.not_before is None or now >= self.not_before

    def window_open(self, now: float) -> bool:
        return self.window is None or self.window.current(now) is not None

    def may_start_stage(self, now: float) -> bool:
        """Whether new devices may be taken into a stage now (not before, inside the window)."""
        return self.started(now) and self.window_open(now)

    def waiting(self, now: float) -> str | None:
        """Why the rollout does not start stage work now, in words; None when it may."""
        if not self.started(now):
            assert self.not_before is not None
            tz = self.window.timezone if self.window else "UTC"
            return f"not started: starts not before {local_iso(self.not_before, tz)}"
        if self.window is not None and self.window.current(now) is None:
            nxt = self.window.upcoming(now)
            when = self.window.local_iso(nxt[0][0]) if nxt else "never (the cron expression has no match)"
            return f"outside maintenance window, next opens {when}"
        return None

    def device_window(self, tags: dict[str, str]) -> Window | None:
        """The window a device activates in (None: any time), from its tags and the rollout's."""
        if not self.device_windows:
            return None
        tz = tags.get(TZ_TAG) or (self.window.timezone if self.window else "UTC")
        if not _zone_ok(tz):
            tz = self.window.timezone if self.window else "UTC"
        own = tags.get(WINDOW_TAG)
        if own:
            try:
                cron, duration = _split_window_tag(own)
                return Window(cron, duration, tz)
            except ScheduleError:
                pass  # a bad tag falls back to the rollout's window (the status shows the tag)
        if self.window is None:
            return None
        return Window(self.window.cron, self.window.duration_s, tz)

    def activate_windows(self, tags: dict[str, str], now: float) -> list[list[float]] | None:
        """The UTC intervals a device may activate in (the current one and the next ones), or
        None when it may activate at once."""
        window = self.device_window(tags)
        if window is None:
            return None
        return [[a, b] for a, b in window.upcoming(now, DEVICE_WINDOWS_SENT)]

    def view(self, now: float) -> dict[str, Any]:
        """The schedule as the status document shows it: settings, whether the window is open
        and the next one in the window's zone."""
        out: dict[str, Any] = {**self.to_dict(), "started": self.started(now), "window_open": self.window_open(now),
                               "current_window": None, "next_window": None}
        if self.not_before is not None:
            out["not_before_iso"] = local_iso(self.not_before, self.window.timezone if self.window else "UTC")
        if self.window is not None:
            w = self.window
            cur = w.current(now)
            if cur:
                out["current_window"] = {"opens": w.local_iso(cur[0]), "closes": w.local_iso(cur[1]),
                                         "opens_at": cur[0], "closes_at": cur[1]}
            nxt = [iv for iv in w.upcoming(max(now, self.not_before or now), 2) if iv[0] > now]
            if nxt:
                out["next_window"] = {"opens": w.local_iso(nxt[0][0]), "closes": w.local_iso(nxt[0][1]),
                                      "opens_at": nxt[0][0], "closes_at": nxt[0][1]}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"not_before": self.not_before, "window": self.window.to_dict() if self.window else None,
                "device_windows": self.device_windows}


def schedule_of(spec: Any) -> Schedule | None:
    """A rollout spec's schedule (stored normalized in `spec.schedule`), or None."""
    return parse_schedule(getattr(spec, "schedule", None))


def parse_schedule(raw: Any) -> Schedule | None:
    """A schedule from a rollout request or a stored spec; None when there is none.

    `{"not_before": "2026-12-08T00:00:00+01:00" | epoch seconds, "window": {"cron": "0 2 * * *",
    "duration": "2h" | seconds, "timezone": "Europe/Madrid"}, "device_windows": false}`.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ScheduleError("'schedule' is an object: not_before, window {cron, duration, timezone}, device_windows")
    bad = set(raw) - {"not_before", "window", "device_windows"}
    if bad:
        raise ScheduleError(f"schedule: unknown field(s) {sorted(bad)}; allowed: device_windows, not_before, window")
    not_before = _parse_time(raw.get("not_before")) if raw.get("not_before") is not None else None
    window = _parse_window(raw["window"]) if raw.get("window") is not None else None
    device_windows = raw.get("device_windows", False)
    if not isinstance(device_windows, bool):
        raise ScheduleError("schedule.device_windows is true or false")
    if not_before is None and window is None and not device_windows:
        return None
    return Schedule(not_before=not_before, window=window, device_windows=device_windows)


def _parse_window(raw: Any) -> Window:
    if not isinstance(raw, dict):
        raise ScheduleError("schedule.window is an object: {cron, duration, timezone}")
    bad = set(raw) - {"cron", "duration", "duration_s", "timezone"}
    if bad:
        raise ScheduleError(f"schedule.window: unknown field(s) {sorted(bad)}; allowed: cron, duration, timezone")
    cron = raw.get("cron")
    if not isinstance(cron, str) or not _cron_ok(cron):
        raise ScheduleError(f"schedule.window.cron {cron!r} is not a 5-field cron expression (e.g. '0 2 * * *')")
    duration = raw.get("duration", raw.get("duration_s"))
    if duration is None:
        raise ScheduleError("schedule.window.duration is required: e.g. '2h', '90m' or seconds")
    tz = raw.get("timezone", "UTC")
    if not isinstance(tz, str) or not _zone_ok(tz):
        raise ScheduleError(f"schedule.window.timezone {tz!r} is not an IANA time zone (e.g. 'Europe/Madrid')")
    return Window(cron=" ".join(cron.split()), duration_s=parse_duration(duration), timezone=tz)


def parse_duration(raw: Any) -> float:
    """Seconds from a number or a text like '2h', '90m', '1h30m', '1d'."""
    if isinstance(raw, bool):
        raise ScheduleError("a window duration is seconds or a text like '2h'")
    if isinstance(raw, int | float):
        seconds = float(raw)
    elif isinstance(raw, str) and (m := _DURATION.match(raw)) and any(m.groups()):
        d, h, mi, s = (float(x) if x else 0.0 for x in m.groups())
        seconds = d * 86400 + h * 3600 + mi * 60 + s
    else:
        raise ScheduleError(f"window duration {raw!r}: give seconds or a text like '2h', '90m', '1h30m'")
    if not 0 < seconds <= MAX_DURATION_S:
        raise ScheduleError(f"window duration must be more than 0 and at most 7 days, not {seconds:g} s")
    return seconds


def _split_window_tag(value: str) -> tuple[str, float]:
    cron, sep, duration = value.rpartition(";")
    if not sep or not _cron_ok(cron.strip()):
        raise ScheduleError(f"tag {WINDOW_TAG}={value!r}: write 'CRON; DURATION', e.g. '0 3 * * *; 90m'")
    return " ".join(cron.split()), parse_duration(duration.strip())


def _parse_time(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ScheduleError("schedule.not_before is an ISO 8601 time with its offset or epoch seconds")
    value: float | None = None
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            dt = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
        except ValueError:
            dt = None
        if dt is not None and dt.tzinfo is not None:
            value = dt.timestamp()
    if value is not None:
        if not 0 <= value <= LATEST_START:  # also NaN; later years overflow the cron arithmetic
            raise ScheduleError("schedule.not_before must be between 1970 and 2100")
        return value
    raise ScheduleError(f"schedule.not_before {raw!r}: give an ISO 8601 time with its offset "
                       "(e.g. '2026-12-08T02:00:00+01:00' or '...Z') or epoch seconds")


def _cron_ok(expr: str) -> bool:
    """A 5-field expression croniter reads and that matches some day (not `0 2 31 2 *`)."""
    if len(expr.split()) != 5 or not croniter.is_valid(expr):
        return False
    try:
        croniter(expr, datetime(2026, 1, 1)).get_next(datetime)
    except (CroniterError, ValueError):
        return False
    return True


def _zone_ok(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def local_iso(ts: float, tz: str) -> str:
    """`ts` as ISO 8601 to the minute, with the offset `tz` has then."""
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).isoformat(timespec="minutes")

