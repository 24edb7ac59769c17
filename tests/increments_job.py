"""A build_increments job for the kill-and-rerun test (run as a subprocess).

    python tests/increments_job.py ANALYSES FORECASTS OUT CHUNK [FLAG SLEEP]

With FLAG and SLEEP, the job sleeps SLEEP seconds after each chunk it writes and
creates FLAG once two chunks are written, so the test can kill it in mid-write.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dask.callbacks import Callback

from data_pipeline.increments import build_increments


class SlowWrite(Callback):
    """After each written chunk, sleep; raise FLAG once two chunks are on disk."""

    def __init__(self, flag: Path, sleep: float) -> None:
        super().__init__()
        self.flag, self.sleep, self.written = flag, sleep, 0

    def _posttask(self, key, result, dsk, state, id) -> None:  # noqa: A002 (dask's name)
        if "increments-chunk" in str(key):
            self.written += 1
            if self.written == 2:
                self.flag.touch()
            time.sleep(self.sleep)


def main(argv: list[str]) -> None:
    analyses, forecasts, out, chunk = argv[:4]
    kwargs = dict(window=0.05, out=out, chunk_samples=int(chunk), scheduler="sync")
    if len(argv) > 4:
        with SlowWrite(Path(argv[4]), float(argv[5])):
            build_increments(analyses, forecasts, **kwargs)
    else:
        build_increments(analyses, forecasts, **kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
