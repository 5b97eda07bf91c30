"""Progress lines while a checkpoint loads: a large model takes minutes, and the log should say how far it is."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("conveyor.loader")

# Log a progress line each time this fraction of the checkpoint's bytes has been read.
_PROGRESS_STEP = 0.1


class LoadProgress:
    """Logs '<source>: N% of X MiB' each time another `_PROGRESS_STEP` of the bytes has been read."""

    def __init__(self, source: str, total_bytes: int) -> None:
        self.source = os.path.basename(source.rstrip("/")) or source
        self.total_bytes = max(total_bytes, 1)
        self.read_bytes = 0
        self.next_report = _PROGRESS_STEP
        logger.info("loading weights from %s (%.1f MiB)", source, total_bytes / 2**20)

    def advance(self, num_bytes: int) -> None:
        self.read_bytes += num_bytes
        fraction = self.read_bytes / self.total_bytes
        if fraction >= self.next_report and fraction < 1.0:
            logger.info("%s: %d%% of %.1f MiB", self.source, int(fraction * 100), self.total_bytes / 2**20)
            while self.next_report <= fraction:
                self.next_report += _PROGRESS_STEP

    def done(self) -> None:
        logger.info("%s: loaded %.1f MiB", self.source, self.read_bytes / 2**20)
