"""The report's PNG plots (matplotlib, headless Agg backend), one figure per file, runs overlaid in one colour each.

Series longer than a few thousand points are drawn from buckets: the bucket mean as the line and its min-max as
a light band, so that a million-step log draws as fast as a short one and keeps its spikes visible. Restarts are
dashed vertical lines in the run's colour; skipped steps are red ticks along the bottom of the axes.
"""
from __future__ import annotations

import math
import os

import numpy as np

POINTS = 2000  # drawn points per series at most
STRAGGLER_THRESHOLD = 1.2  # log.straggler_ratio's default, drawn for reference


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def buckets(x: np.ndarray, y: np.ndarray, n: int = POINTS):
    """(x, mean, low, high) of at most `n` buckets over the finite points; low/high None when not bucketed."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) <= n:
        return x, y, None, None
    size = -(-len(x) // n)
    pad = (-len(x)) % size
    xs = np.concatenate([x, np.full(pad, np.nan)]).reshape(-1, size)
    ys = np.concatenate([y, np.full(pad, np.nan)]).reshape(-1, size)
    return np.nanmean(xs, 1), np.nanmean(ys, 1), np.nanmin(ys, 1), np.nanmax(ys, 1)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` lines (non-finite values left out), as TensorBoard's smoothing shows."""
    ok = np.isfinite(y)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    k = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - window)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c[i] - c[lo]) / (k[i] - k[lo])


def smoothing_window(n: int) -> int:
    return max(1, min(n // 5, max(n // 50, 5)))


def _draw(ax, x, y, color, label=None, lw=1.5, alpha=1.0, band=True, **kw):
    bx, mean, lo, hi = buckets(x, y)
    line = ax.plot(bx, mean, color=color, lw=lw, alpha=alpha, label=label, **kw)
    if lo is not None and band:
        ax.fill_between(bx, lo, hi, color=color, alpha=0.15 * alpha + 0.05, lw=0)
    return line


def _marks(ax, run, color, label_once: set):
    """Restarts (dashed lines at the step a new process began) and skipped steps (red ticks)."""
    for r in run.restarts:
        label = "restart" if "restart" not in label_once else None
        label_once.add("restart")
        ax.axvline(r.step, color=color, ls="--", lw=1.0, alpha=0.8, label=label)
    if run.skipped is not None and len(run.skipped):
        label = "skipped step" if "skipped" not in label_once else None
        label_once.add("skipped")
        ax.plot(run.skipped, np.full(len(run.skipped), 0.02), ls="", marker="|", ms=12, mew=1.5, color="red",
                transform=ax.get_xaxis_transform(), label=label)


def _segments(run, key):
    for a, b in run.segments():
        yield run.train["step"][a:b], run.train[key][a:b]


def _steps(value, _pos=None) -> str:
    """Tick labels such as 250k or 1.5M instead of an offset (1e6) in the corner."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:g}{unit}"
    return f"{value:g}"


def _finish(fig, ax, path, xlabel="step", legend=True):
    ax.set_xlabel(xlabel)
    if xlabel == "step":
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(_steps))
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _has(runs, key, where="train") -> bool:
    return any(np.isfinite(getattr(r, where)[key]).any() for r in runs)


def _figure(plt, rows=1):
    fig, axes = plt.subplots(rows, 1, figsize=(10, 4.2 if rows == 1 else 6.5), dpi=100, sharex=True, squeeze=False)
    return fig, [a[0] for a in axes]


def _name(run, runs, what):
    return f"{run.name}: {what}" if len(runs) > 1 else what


def plot_loss(plt, runs, colors, path):
    fig, (ax,) = _figure(plt)
    once: set = set()
    for run, color in zip(runs, colors):
        first = True
        for x, y in _segments(run, "loss"):
            w = smoothing_window(len(y))
            if w == 1:  # too few lines to smooth: the raw line is the line
                _draw(ax, x, y, color, _name(run, runs, "train") if first else None, marker=".")
            else:
                _draw(ax, x, y, color, _name(run, runs, "train (raw)") if first else None, lw=0.8, alpha=0.35)
                _draw(ax, x, smooth(y, w), color, _name(run, runs, f"train (mean of {w} lines)") if first else None,
                      lw=1.8, band=False)
            first = False
        va = run.valid
        if len(va["step"]):
            order = np.argsort(va["step"], kind="stable")
            ax.plot(va["step"][order], va["loss"][order], color=color, ls=":", marker="o", ms=4, lw=1.2,
                    markeredgecolor="black", markeredgewidth=0.5, label=_name(run, runs, "valid"))
        _marks(ax, run, color, once)
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title("Training and validation loss")
    _finish(fig, ax, path)


def plot_series(plt, runs, colors, path, key, ylabel, title, scale=1.0, log_y=None, from_zero=False):
    fig, (ax,) = _figure(plt)
    once: set = set()
    for run, color in zip(runs, colors):
        first = True
        for x, y in _segments(run, key):
            _draw(ax, x, y * scale, color, run.name if first and len(runs) > 1 else None)
            first = False
        _marks(ax, run, color, once)
    values = np.concatenate([r.train[key] for r in runs]) * scale
    values = values[np.isfinite(values) & (values > 0)]
    if log_y is None:
        log_y = len(values) > 0 and values.max() / max(values.min(), 1e-30) > 100
    if log_y:
        ax.set_yscale("log")
    elif from_zero:
        ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _finish(fig, ax, path)


def plot_throughput(plt, runs, colors, path):
    fig, (top, bottom) = _figure(plt, 2)
    once: set = set()
    mfu = _has(runs, "mfu")
    for run, color in zip(runs, colors):
        first = True
        for (x, tps), (_, util) in zip(_segments(run, "tokens_per_sec"), _segments(run, "mfu" if mfu else "tflops")):
            label = run.name if first and len(runs) > 1 else None
            _draw(top, x, tps, color, label)
            _draw(bottom, x, util * (100 if mfu else 1), color, label)
            first = False
        _marks(top, run, color, once)
        _marks(bottom, run, color, set(once))
    top.set_ylabel("tokens/s (all ranks)")
    top.set_title("Throughput")
    bottom.set_ylabel("MFU (% of peak)" if mfu else "model TFLOP/s per device\n(MFU: peak unknown)")
    top.grid(True, alpha=0.3)
    if len(runs) > 1 or once:
        top.legend(loc="best", fontsize=8)
    _finish(fig, bottom, path, legend=False)


def plot_timeline(plt, runs, colors, path):
    """Steps against wall-clock time: a restart shows as a gap (time lost) or a step back (work redone)."""
    fig, (ax,) = _figure(plt)
    skipped_label = True
    span = max(np.nanmax(r.train["time"]) - np.nanmin(r.train["time"]) for r in runs if _has([r], "time"))
    unit, div = next((u, d) for u, d, top in (("seconds", 1, 120), ("minutes", 60, 7200), ("hours", 3600, 3 * 86400),
                                              ("days", 86400, math.inf)) if span <= top)
    for run, color in zip(runs, colors):
        if not _has([run], "time"):
            continue
        t, step = run.train["time"], run.train["step"]
        t0 = np.nanmin(t)
        first = True
        for a, b in run.segments():
            _draw(ax, (t[a:b] - t0) / div, step[a:b], color, run.name if first and len(runs) > 1 else None,
                  band=False, marker="." if b - a < 50 else None)
            first = False
        for r in run.restarts:
            if math.isfinite(t[r.row]):
                h = (t[r.row] - t0) / div
                ax.axvline(h, color=color, ls="--", lw=1.0, alpha=0.8)
                lost = "?" if math.isnan(r.lost_s) else f"{r.lost_s / 60:.1f} min lost"
                ax.annotate(f"restart at step {r.step}\n({lost})", (h, r.step), xytext=(4, -24),
                            textcoords="offset points", fontsize=8, color=color)
        if len(run.skipped):
            at = np.interp(run.skipped, step[np.isfinite(t)], (t[np.isfinite(t)] - t0) / div)
            ax.plot(at, run.skipped, ls="", marker="x", color="red", ms=6,
                    label="skipped step" if skipped_label else None)
            skipped_label = False
    ax.set_ylabel("step")
    ax.set_title("Progress over wall-clock time (restarts marked)")
    _finish(fig, ax, path, xlabel=f"wall-clock time since the first line ({unit})")


def plot_stragglers(plt, runs, colors, path):
    fig, (top, bottom) = _figure(plt, 2)
    texts = []
    for run, color in zip(runs, colors):
        tr = run.train
        ok = np.isfinite(tr["straggler_ratio"])
        busy = {"slowest rank": tr["rank_forward_s"] + np.nan_to_num(tr["rank_data_s"]),
                "median rank": tr["median_forward_s"] + np.nan_to_num(tr["median_data_s"])}
        for k, (a, b) in enumerate(run.segments()):
            x, keep = tr["step"][a:b], ok[a:b]
            _draw(top, x[keep], tr["straggler_ratio"][a:b][keep], color, run.name if len(runs) > 1 and not k else None)
            for what, ls in (("slowest rank", "-"), ("median rank", ":")):
                _draw(bottom, x[keep], busy[what][a:b][keep] * 1000, color, _name(run, runs, what) if not k else None,
                      ls=ls, band=ls == "-")
        over = ok & (tr["straggler_ratio"] > STRAGGLER_THRESHOLD)
        if over.any():  # name the ranks most often slowest past the threshold
            ranks, counts = np.unique(tr["slowest_rank"][over], return_counts=True)
            top3 = np.argsort(-counts, kind="stable")[:3]
            hosts = {int(r): h for r, h in zip(tr["slowest_rank"][over], tr["slowest_host"][over])}
            text = "; ".join(f"rank {int(ranks[i])} ({hosts.get(int(ranks[i])) or '?'}): {counts[i]}x"
                             for i in top3)
            texts.append(f"{_name(run, runs, 'over the threshold')}: {text}")
    top.axhline(STRAGGLER_THRESHOLD, color="gray", ls="--", lw=1, label=f"warning threshold "
                f"(log.straggler_ratio default {STRAGGLER_THRESHOLD})")
    if texts:
        top.text(0.99, 0.95, "\n".join(texts), transform=top.transAxes, va="top", ha="right", fontsize=8,
                 bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#ccc"})
    top.set_ylabel("slowest / median rank")
    top.set_title("Stragglers: per-rank data wait + forward time, per step")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_ylabel("data wait + forward\n(ms per step)")
    _finish(fig, bottom, path)


def write_plots(runs, out_dir: str) -> list[tuple[str, str]]:
    """Draw every plot the logs have data for; returns [(file name, title)] in report order."""
    plt = _pyplot()
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    made = []

    def out(name, title):
        made.append((name, title))
        return os.path.join(out_dir, name)

    if _has(runs, "loss") or any(len(r.valid["step"]) for r in runs):
        plot_loss(plt, runs, colors, out("loss.png", "Loss"))
    if _has(runs, "lr"):
        plot_series(plt, runs, colors, out("lr.png", "Learning rate"), "lr", "learning rate", "Learning rate",
                    log_y=False)
    if _has(runs, "grad_norm"):
        plot_series(plt, runs, colors, out("grad_norm.png", "Gradient norm"), "grad_norm",
                    "gradient norm (global L2, before clipping)", "Gradient norm")
    if _has(runs, "tokens_per_sec"):
        plot_throughput(plt, runs, colors, out("throughput.png", "Throughput and MFU"))
    if _has(runs, "mem_mb"):
        gib = max(np.nanmax(r.train["mem_mb"]) for r in runs if _has([r], "mem_mb")) >= 2048
        plot_series(plt, runs, colors, out("memory.png", "Memory"), "mem_mb",
                    f"peak memory of rank 0 ({'GiB' if gib else 'MiB'})",
                    "Memory (GPU: peak allocated by torch; CPU: peak resident set)", scale=1 / 1024 if gib else 1,
                    log_y=False, from_zero=True)
    if _has(runs, "time"):
        plot_timeline(plt, runs, colors, out("timeline.png", "Progress, restarts and skipped steps"))
    if _has(runs, "straggler_ratio"):
        plot_stragglers(plt, runs, colors, out("stragglers.png", "Stragglers"))
    return made
