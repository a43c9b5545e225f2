"""Progress bars for long work (tqdm), shared by knn_graph and the CLI."""
import sys


def stderr_is_tty():
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


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
