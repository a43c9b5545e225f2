"""Progress bars for long work (tqdm): when to show one by default, and the bar itself.

A call that takes ``progress=None`` shows a bar when its work is at least the threshold of its kind
and stderr is a terminal (:func:`wanted`); the thresholds are here, one per kind of work.
"""
import sys

#: ``Index.add_items``: rows inserted.
ADD_ITEMS_MIN_ROWS = 100_000
#: ``knn_graph``: rows of the data.
KNN_GRAPH_MIN_ROWS = 50_000
#: ``gpuhnsw build`` (the CLI): rows of the data.
CLI_BUILD_MIN_ROWS = 10_000


def stderr_is_tty():
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def wanted(progress, work, threshold=0):
    """Whether to show a bar: ``progress`` where given, else ``work >= threshold`` on a terminal."""
    if progress is not None:
        return bool(progress)
    return work >= threshold and stderr_is_tty()


class Progress:
    """``with Progress(enabled, total, desc) as bar: bar.to(done)``; silent without tqdm."""

    def __init__(self, enabled, total, desc):
        self._bar = None
        self._done = 0
        if enabled and total > 0:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="it", leave=False)

    def to(self, done):
        if self._bar is not None and done > self._done:
            self._bar.update(done - self._done)
            self._done = done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False
