"""Shared helpers for the side-by-side benchmark scripts (imported from the same folder).

The machine is a shared 2-core VM: other processes regularly take one or both
cores. To tell clean samples from disturbed ones, every timed sample also
records the fraction of the machine's CPU time (all cores, from /proc/stat,
steal included) that was spent by *other* processes during the sample:

    foreign = (busy_jiffies_delta - own_process_jiffies_delta) / total_jiffies_delta

A sample is "quiet" when foreign <= QUIET (default 0.05). summarize() reports
median/min/max over all samples and over the quiet ones only.
Linux-only (reads /proc); on other systems foreign is None and only the
all-samples statistics are reported.
"""
import statistics
import time

QUIET = 0.05


def _snap():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        total = sum(v[:8])
        with open("/proc/self/stat") as f:
            s = f.read().rsplit(")", 1)[1].split()
        own = int(s[11]) + int(s[12])  # utime + stime of all threads
        return busy, total, own
    except (OSError, IndexError, ValueError):
        return None


class Sample:
    """with Sample() as s: work  ->  s.dt (seconds), s.foreign (fraction or None)."""

    def __enter__(self):
        self._c = _snap()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.dt = time.perf_counter() - self._t
        c1 = _snap()
        self.foreign = None
        if self._c and c1:
            db, dt_, do = (c1[i] - self._c[i] for i in range(3))
            self.foreign = max(0.0, (db - do) / dt_) if dt_ > 0 else 0.0
        return False


def stats(vals):
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(values, foreign, quiet=QUIET):
    """values: per-sample throughputs; foreign: matching foreign fractions."""
    out = {"all": stats(values), "values": values, "foreign": foreign}
    if foreign and all(f is not None for f in foreign):
        out["quiet"] = stats([v for v, f in zip(values, foreign) if f <= quiet])
    return out
