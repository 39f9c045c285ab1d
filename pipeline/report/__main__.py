"""`python -m pipeline.report LOG_OR_RUN... --output DIR [--summary]`: plots and an HTML report of training runs.

Each LOG_OR_RUN is a `log.jsonl` written by pipeline.train (appended across resumes and requeues), the folder
holding it, or a checkpoint folder whose run config names it. Several runs are overlaid, one colour each.

Writes into DIR: loss.png (train raw and smoothed, valid), lr.png, grad_norm.png, throughput.png (tokens/s and
MFU), memory.png, timeline.png (steps over wall-clock time), stragglers.png (when the log has per-rank timing),
and report.html, self-contained (images embedded), with the summary table. Restarts are marked on every plot;
skipped steps too. `--summary` prints the table and writes nothing.

Exit codes: 0 done; 2 bad input (one `error:` line naming the file and line); 1 any other failure.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", metavar="LOG_OR_RUN", help="log.jsonl files or the folders holding them")
    p.add_argument("--output", metavar="DIR", default=None, help="folder for the PNGs and report.html (created)")
    p.add_argument("--summary", action="store_true", help="print the summary table only (no files written)")
    p.add_argument("--names", default=None, metavar="A,B,...",
                   help="comma-separated run names for the legend (default: each log's folder name)")
    args = p.parse_args(argv)
    if not args.summary and not args.output:
        p.error("--output DIR is required (or --summary to print the table only)")
    return args


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "n/a"
    s = int(round(s))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d}d {h}h {m:02d}m" if d else f"{h}h {m:02d}m" if h else f"{m}m {s % 60:02d}s"


def _count(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{int(v):,}"


def _num(v: float, fmt: str = "{:.4f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def table_rows(runs, summaries) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) for the summary table."""
    def at(v, step):
        return f"{v} (step {int(step)})" if v != "n/a" and math.isfinite(step) else v

    def straggler(s):
        if not math.isfinite(s["straggler_ratio"]):
            return "n/a"
        host = f" on {s['straggler_host']}" if s["straggler_host"] else ""
        return f"{s['straggler_ratio']:.2f}x: rank {int(s['straggler_rank'])}{host} (step {int(s['straggler_step'])})"
    rows = [
        ("steps", [f"{int(s['steps']):,}" if math.isfinite(s["steps"]) else "n/a" for s in summaries]),
        ("tokens", [_count(s["tokens"]) for s in summaries]),
        ("wall time", [_duration(s["wall_s"]) for s in summaries]),
        ("final train loss", [_num(s["train_loss"]) for s in summaries]),
        ("final valid loss", [_num(s["valid_loss"]) for s in summaries]),
        ("best valid perplexity", [at(_num(s["best_ppl"], "{:.2f}"), s["best_ppl_step"]) for s in summaries]),
        ("mean MFU", [_num(100 * s["mean_mfu"], "{:.1f}%") for s in summaries]),
        ("restarts", [str(s["restarts"]) for s in summaries]),
        ("time lost to restarts", [_duration(s["lost_s"]) if s["restarts"] else "-" for s in summaries]),
        ("skipped steps", [str(s["skipped"]) for s in summaries]),
        ("worst straggler", [straggler(s) for s in summaries]),
    ]
    return [("run", [r.name for r in runs])] + rows


def format_table(rows) -> str:
    widths = [max(len(row[0]) for row in rows)] + [max(len(row[1][i]) for row in rows) for i in range(len(rows[0][1]))]
    lines = []
    for label, cells in rows:
        lines.append("  ".join([label.ljust(widths[0])] + [c.ljust(w) for c, w in zip(cells, widths[1:])]).rstrip())
        if label == "run":
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def restart_notes(run) -> list[str]:
    notes = []
    for r in run.restarts:
        how = "steps repeated from a checkpoint" if r.step <= r.previous_step else "resumed where it stopped"
        lost = "time lost unknown (no timestamps)" if math.isnan(r.lost_s) else f"{_duration(r.lost_s)} lost"
        notes.append(f"{run.name}: restart after step {r.previous_step}, next logged step {r.step} ({how}); {lost}")
    return notes


def write_html(runs, rows, plots, out_dir: str) -> str:
    """report.html with every PNG embedded (base64): one file to copy or attach."""
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Training report</title><style>",
             "body{font-family:sans-serif;max-width:1060px;margin:2em auto;color:#222}",
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:left}th{background:#f2f2f2}img{max-width:100%;margin:0.5em 0 1.5em}",
             ".note{color:#555;font-size:90%}</style></head><body>",
             f"<h1>Training report</h1><p class='note'>{e(', '.join(r.path for r in runs))}</p>",
             "<h2>Summary</h2><table>"]
    for i, (label, cells) in enumerate(rows):
        tag = "th" if i == 0 else "td"
        parts.append(f"<tr><th>{e(label)}</th>" + "".join(f"<{tag}>{e(c)}</{tag}>" for c in cells) + "</tr>")
    parts.append("</table>")
    notes = [n for r in runs for n in restart_notes(r)] + [w for r in runs for w in r.warnings]
    if notes:
        parts.append("<h2>Restarts and warnings</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    for name, title in plots:
        with open(os.path.join(out_dir, name), "rb") as f:
            data = base64.b64encode(f.read()).decode()
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    from .runlog import LogError, read_log, summarize

    names = args.names.split(",") if args.names else [None] * len(args.logs)
    if len(names) != len(args.logs):
        print(f"error: --names has {len(names)} names for {len(args.logs)} logs", file=sys.stderr)
        sys.exit(2)
    try:
        runs = [read_log(path, name) for path, name in zip(args.logs, names)]
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    seen: dict = {}
    for run in runs:  # two folders of the same name: tell them apart in the legend
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"
    for run in runs:
        for w in run.warnings:
            print(f"warning: {w}", file=sys.stderr)
    rows = table_rows(runs, [summarize(r) for r in runs])
    print(format_table(rows))
    for run in runs:
        for note in restart_notes(run):
            print(note)
    if args.summary:
        return
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        print(f"error: --output {args.output}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    from .plots import write_plots

    plots = write_plots(runs, args.output)
    path = write_html(runs, rows, plots, args.output)
    print(f"wrote {len(plots)} plots and {path}")


if __name__ == "__main__":
    main()
