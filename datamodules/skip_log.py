"""Logging of skipped rows that stays short: a wrong image folder skips every row the same way.

Readers count every skip (``skipped``, printed in their summary line); :class:`SkipLog` logs the
first few of each class in full, so the cause is visible, then one line saying that the rest of that
class is counted, not logged.
"""

from __future__ import annotations

import logging
from collections import Counter


class SkipLog:
    """Logs the first ``shown`` skips of each class (a short name of the reason) to ``log``.

    Args:
        log: the reader's logger.
        shown: full lines per class before the rest is only counted.
    """

    def __init__(self, log: logging.Logger, shown: int = 3) -> None:
        self.log, self.shown = log, shown
        self.counts: Counter[str] = Counter()

    def skipped(self, kind: str, message: str) -> None:
        """Count one skip of class ``kind``; log ``message`` while the class has few."""
        self.counts[kind] += 1
        if self.counts[kind] <= self.shown:
            self.log.warning("skipped %s", message)
        if self.counts[kind] == self.shown + 1:
            self.log.warning("further skips (%s) are counted, not logged: see the summary at the end", kind)
