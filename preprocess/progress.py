"""Progress of a tokenize run: a tqdm bar on a terminal, a log line every `interval` seconds otherwise."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("preprocess")


class Progress:
    def __init__(self, total_bytes: int, desc: str = "tokenize", interval: float = 30.0):
        self.t0 = self.last = time.time()
        self.docs = self.tokens = self.bytes = 0
        self.total_bytes = total_bytes
        self.desc, self.interval = desc, interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr)

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        now = time.time()
        dt = max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s", refresh=False)
        elif now - self.last >= self.interval:
            self.last = now
            pct = f" ({100 * self.bytes / self.total_bytes:.0f}%)" if self.total_bytes else ""
            log.info("%s: %s docs, %s tokens, %.1f MB%s; %.0f docs/s, %.0f tokens/s, %.2f MB/s", self.desc,
                     f"{self.docs:,}", f"{self.tokens:,}", self.bytes / 1e6, pct, self.docs / dt,
                     self.tokens / dt, self.bytes / dt / 1e6)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        dt = max(time.time() - self.t0, 1e-9)
        log.info("%s: %s docs, %s tokens in %.1f s (%.0f tokens/s)", self.desc, f"{self.docs:,}",
                 f"{self.tokens:,}", dt, self.tokens / dt)
