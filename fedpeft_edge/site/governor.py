"""The site's resource governor: the plant's own work comes first.

A gateway or industrial PC runs the plant; the agent trains only in what is left. The governor says, at
any moment, whether training may go on and, when it may not, why (the reason becomes the site's status
detail, e.g. ``paused: outside training window 22:00-06:00``):

- **training windows** in local time, ``"HH:MM-HH:MM"``, several allowed; a window whose end is before
  its start crosses midnight (``"22:00-06:00"``). No windows: any time.
- **other processes' CPU**: the whole machine's CPU use minus this process's own (percent of all cores,
  as ``psutil.cpu_percent()`` counts), averaged over ``cpu_window_s``. Pauses above
  ``max_other_cpu_percent``; resumes only below it minus ``hysteresis_percent`` so a load hovering at
  the limit does not flap the site between paused and training.
- **available memory** (``psutil.virtual_memory().available``): pauses below ``min_available_mb``,
  resumes at ``min_available_mb`` plus ``hysteresis_percent`` of it.
- **a thread cap** (``max_threads``) applied where the trainer is built (site/trainer_setup.py):
  intra-op threads never exceed it, whatever ``[agent] threads`` says.

The default (no windows, no limits) restricts nothing, and :meth:`Governor.check` then costs one
attribute test. The clock (local wall time), the monotonic clock and the load probe are injectable for
tests. What the agent does with a pause is described in site/agent.py (``_governed``).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedpeft_edge.runtime.errors import InvalidValueError

_WINDOW_RE = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")
MIN_SPAN_S = 0.1  # a CPU reading over less than this is noise: the probe waits that long first


@dataclass(frozen=True)
class Window:
    """A daily training window ``[start, end)`` in minutes after local midnight; ``end < start`` crosses
    midnight, ``end == start`` is the whole day."""

    start: int
    end: int
    text: str

    def contains(self, minute: int) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # e.g. 22:00-06:00


def parse_window(text: str) -> Window:
    """``"22:00-06:00"`` → :class:`Window`; ``24:00`` is allowed as an end (midnight)."""
    m = _WINDOW_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise InvalidValueError(f"window {text!r} is not HH:MM-HH:MM (e.g. \"22:00-06:00\")")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if not (0 <= h1 <= 23 and 0 <= m1 <= 59 and ((0 <= h2 <= 23 and 0 <= m2 <= 59) or (h2, m2) == (24, 0))):
        raise InvalidValueError(f"window {text!r} has an impossible time of day")
    return Window(h1 * 60 + m1, (h2 * 60 + m2) % (24 * 60), f"{h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}")


def parse_windows(texts: Iterable[str]) -> tuple[Window, ...]:
    if isinstance(texts, str):
        raise InvalidValueError("windows is a list of \"HH:MM-HH:MM\" strings")
    return tuple(parse_window(t) for t in texts)


@dataclass(frozen=True)
class LoadSample:
    """What a probe measured: other processes' CPU (percent of all cores) and available memory."""

    other_cpu_percent: float
    available_mb: float


class LoadProbe(Protocol):
    def sample(self) -> LoadSample: ...


class PsutilProbe:
    """The real probe: /proc/stat and this process's CPU times (psutil), averaged over ``window_s``.

    Each call records a snapshot; the reading is the change between now and the oldest snapshot still
    inside the window, so it is a true average over that span, not an instantaneous value."""

    def __init__(self, window_s: float = 10.0, pid: int | None = None) -> None:
        import psutil  # lazily: importing the agent must stay light (tests/test_layers.py)

        self._psutil = psutil
        self._proc = psutil.Process(pid)
        self.window_s = float(window_s)
        self._snaps: deque[tuple[float, float, float, float]] = deque()
        self._snaps.append(self._snapshot())

    def _snapshot(self) -> tuple[float, float, float, float]:
        """(monotonic time, machine busy CPU-seconds, machine total CPU-seconds, own CPU-seconds)."""
        t = self._psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guest is inside user
        idle = t.idle + getattr(t, "iowait", 0.0)
        own = self._proc.cpu_times()
        # Children too: a trainer's helper subprocesses are this agent's load, not the plant's.
        own_s = own.user + own.system + getattr(own, "children_user", 0.0) + \
            getattr(own, "children_system", 0.0)
        return time.monotonic(), total - idle, total, own_s

    def sample(self) -> LoadSample:
        if time.monotonic() - self._snaps[-1][0] < MIN_SPAN_S:
            time.sleep(MIN_SPAN_S)
        now = self._snapshot()
        while len(self._snaps) > 1 and now[0] - self._snaps[1][0] >= self.window_s:
            self._snaps.popleft()  # keep the newest snapshot that still spans the whole window
        _, busy0, total0, own0 = self._snaps[0]
        self._snaps.append(now)
        d_total = now[2] - total0
        if d_total <= 0:
            other = 0.0
        else:
            other = 100.0 * ((now[1] - busy0) - (now[3] - own0)) / d_total
        avail = self._psutil.virtual_memory().available / (1024 * 1024)
        return LoadSample(min(100.0, max(0.0, other)), float(avail))


def local_now() -> dt.datetime:
    return dt.datetime.now()  # naive local wall time: windows are the plant's clock


class Governor:
    """Whether training may run now (:meth:`check`), and the thread cap (:meth:`cap_threads`)."""

    def __init__(self, windows: Sequence[str] = (), max_other_cpu_percent: float | None = None,
                 min_available_mb: float | None = None, max_threads: int | None = None,
                 check_interval_s: float = 5.0, cpu_window_s: float = 10.0, hysteresis_percent: float = 10.0,
                 *, clock: Callable[[], dt.datetime] | None = None, probe: LoadProbe | None = None,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.windows = parse_windows(windows)
        for name, val, low, high in (("max_other_cpu_percent", max_other_cpu_percent, 0, 100),
                                     ("min_available_mb", min_available_mb, 0, None),
                                     ("check_interval_s", check_interval_s, 0, None),
                                     ("cpu_window_s", cpu_window_s, 0, None),
                                     ("hysteresis_percent", hysteresis_percent, 0, 100)):
            if val is None:
                continue
            if isinstance(val, bool) or not isinstance(val, int | float) or val != val or val < low or (
                    high is not None and val > high):
                raise InvalidValueError(f"{name} = {val!r} must be a number in "
                                        f"[{low}, {high if high is not None else 'inf'}]")
        if max_threads is not None and (isinstance(max_threads, bool) or not isinstance(max_threads, int)
                                        or max_threads < 1):
            raise InvalidValueError(f"max_threads = {max_threads!r} must be an integer >= 1")
        self.max_cpu = None if max_other_cpu_percent is None else float(max_other_cpu_percent)
        self.min_mb = None if min_available_mb is None else float(min_available_mb)
        self.max_threads = max_threads
        self.check_interval_s = float(check_interval_s)
        self.cpu_window_s = float(cpu_window_s)
        self.hysteresis = float(hysteresis_percent)
        self._clock = clock or local_now
        self._mono = monotonic or time.monotonic
        self._probe = probe
        self.enabled = bool(self.windows) or self.max_cpu is not None or self.min_mb is not None
        self._cpu_high = False  # hysteresis state: paused for CPU until it falls below the resume level
        self._mem_low = False
        self._last_check: float | None = None
        self._reason: str | None = None
        self.last_sample: LoadSample | None = None

    @classmethod
    def from_settings(cls, s: Any, **inject: Any) -> Governor:
        """From a ``[governor]`` section (site/config.py ``GovernorSettings``); ``inject``: clock, probe,
        monotonic (tests)."""
        return cls(list(s.windows), s.max_other_cpu_percent, s.min_available_mb, s.max_threads,
                   s.check_interval_s, s.cpu_window_s, s.hysteresis_percent, **inject)

    def cap_threads(self, threads: int) -> int:
        return threads if self.max_threads is None else max(1, min(int(threads), self.max_threads))

    @property
    def reason(self) -> str | None:
        """The reason of the last check (None: training may run)."""
        return self._reason

    def check(self, *, force: bool = False) -> str | None:
        """Why training must wait now, or None. Re-evaluated at most every ``check_interval_s`` (the
        cached answer in between), so calling it before every training step is cheap."""
        if not self.enabled:
            return None
        now = self._mono()
        if not force and self._last_check is not None and now - self._last_check < self.check_interval_s:
            return self._reason
        self._last_check = now
        self._reason = self._evaluate()
        return self._reason

    def _evaluate(self) -> str | None:
        reasons: list[str] = []
        if self.windows:
            t = self._clock()
            minute = t.hour * 60 + t.minute
            if not any(w.contains(minute) for w in self.windows):
                reasons.append("outside training window " + ", ".join(w.text for w in self.windows))
        if self.max_cpu is not None or self.min_mb is not None:
            # Sampled even when the window is closed: the CPU average must be current when it opens.
            if self._probe is None:
                self._probe = PsutilProbe(self.cpu_window_s)
            s = self.last_sample = self._probe.sample()
            if self.min_mb is not None:
                resume_mb = self.min_mb * (1.0 + self.hysteresis / 100.0)
                self._mem_low = s.available_mb < (resume_mb if self._mem_low else self.min_mb)
                if self._mem_low and s.available_mb < self.min_mb:
                    reasons.append(f"available memory {s.available_mb:.0f} MB < {self.min_mb:.0f} MB")
                elif self._mem_low:
                    reasons.append(f"available memory {s.available_mb:.0f} MB (resuming above "
                                   f"{resume_mb:.0f} MB)")
            if self.max_cpu is not None:
                resume_at = max(0.0, self.max_cpu - self.hysteresis)
                self._cpu_high = s.other_cpu_percent > (resume_at if self._cpu_high else self.max_cpu)
                if self._cpu_high:
                    if s.other_cpu_percent > self.max_cpu:
                        reasons.append(f"other processes use {s.other_cpu_percent:.0f} % CPU > "
                                       f"{self.max_cpu:.0f} %")
                    else:
                        reasons.append(f"other processes use {s.other_cpu_percent:.0f} % CPU "
                                       f"(resuming below {resume_at:.0f} %)")
        return "; ".join(reasons) or None


__all__ = ["Governor", "LoadProbe", "LoadSample", "PsutilProbe", "Window", "local_now", "parse_window",
           "parse_windows"]
