"""Training reports from `log.jsonl`: `python -m pipeline.report` (see `__main__`).

    runlog.py   one pass over a log into numpy columns; restarts, skipped steps, the summary figures
    plots.py    the PNG plots (matplotlib Agg), runs overlaid, long series drawn from buckets
"""
