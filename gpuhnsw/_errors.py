"""Exception types of gpuhnsw.

Where hnswlib raises, gpuhnsw raises the same built-in type (mostly ``RuntimeError``) so existing
``except`` clauses keep working; the classes here subclass those built-ins.
"""
import errno


class IndexFileError(RuntimeError, ValueError):
    """An index file is truncated, corrupted, of an unknown version, or does not match the index."""


class DeviceError(RuntimeError):
    """A GPU was asked for and cannot be used (no CuPy, no device, out of memory)."""


class InputShapeError(ValueError, RuntimeError):
    """Input of the wrong shape or width.

    A ``ValueError``, and also a ``RuntimeError`` because that is what hnswlib raises for the same
    mistake in ``add_items``: ``except RuntimeError`` in existing hnswlib code still catches it.
    """


class IndexFileNotFoundError(FileNotFoundError, RuntimeError):
    """``load_index`` of a missing file: a ``FileNotFoundError``, and a ``RuntimeError`` as hnswlib raises."""

    @classmethod
    def of(cls, exc, name):
        """From the ``FileNotFoundError`` ``exc`` of opening ``name`` (fsspec's carry no errno)."""
        return cls(exc.errno or errno.ENOENT, f"Cannot open file: {exc.strerror or 'No such file or directory'}",
                   exc.filename or name)
