"""Atomic file operations and the locks that make them safe: saves through a temporary file that
its writer holds under ``flock`` and renames over the target, the clean-up of temporary files that
killed saves left behind, whole-file reads, and the checksummed byte ranges of our formats.

A path, an fsspec URL (``"memory://a.idx"``, ``"s3://bucket/a.idx"``; ``"file://"`` is a local
path) or a binary file object (``BytesIO``, an open file, an fsspec file) is accepted wherever a file
is: a URL is written through a temporary name and a move, as a path is; a file object is read from or
written at its position, in place (atomicity is then the caller's, e.g. fsspec's transaction).
"""
import os
import re
import struct
import uuid
import zlib

try:
    import fcntl
except ImportError:  # Windows: no flock, so stale temp files are not cleaned up there
    fcntl = None

from .._errors import IndexFileError

__all__ = ["CRC", "is_file_object", "local_path", "source_name", "read_all", "remove_stale_temps", "atomic_write",
           "checked_section"]

#: The CRC32 that follows a header (little-endian uint32).
CRC = struct.Struct("<I")


def is_file_object(target):
    """A file-like object (``BytesIO``, an open file, an fsspec file) rather than a path."""
    return hasattr(target, "write") or hasattr(target, "read")


def _url(target):
    """``(filesystem, path)`` of an fsspec URL other than ``file://``, else None (a local path or a
    file object).  fsspec is imported only for such a URL."""
    if is_file_object(target):
        return None
    text = os.fspath(target)
    if not isinstance(text, str) or "://" not in text or text.startswith("file://"):
        return None
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"{text}: URLs need fsspec (pip install fsspec, or gpuhnsw[distributed])") from None
    return fsspec.core.url_to_fs(text)


def local_path(target):
    """The local path of a path or ``file://`` URL; None for another URL or a file object."""
    if is_file_object(target) or _url(target) is not None:
        return None
    text = os.fspath(target)
    return text[len("file://"):] if isinstance(text, str) and text.startswith("file://") else text


def source_name(target):
    """How error messages name ``target``: the path or URL, or a file object's name (or its type)."""
    if is_file_object(target):
        return str(getattr(target, "name", None) or f"<{type(target).__name__}>")
    return os.fspath(target)


def read_all(target):
    """The whole content of a path or URL, or of a file object from its current position.  A file
    object that gives nothing although it was read from before (left at its end by a save, say) is an
    IndexFileError saying so, not an "empty file"."""
    if is_file_object(target):
        try:
            pos = target.tell()
        except (AttributeError, OSError, ValueError):
            pos = 0
        data = bytes(target.read())
        if not data and pos:
            raise IndexFileError(f"{source_name(target)}: nothing left to read at position {pos}: the file "
                                 "object is at its end (after a save into it?); rewind it with seek(0)")
        return data
    url = _url(target)
    if url is not None:
        fs, path = url
        with fs.open(path, "rb") as f:
            return f.read()
    target = local_path(target)
    remove_stale_temps(target)
    with open(target, "rb") as f:
        return f.read()


def _temp_pattern(name):
    """Temp files of a save of ``name``: ``.{name}.{12 hex}.tmp`` in the same directory."""
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")


def remove_stale_temps(path):
    """Remove temp files that killed saves of ``path`` left behind.  A live save holds an exclusive
    flock on its temp file, so a temp file whose lock can be taken belongs to no running writer (on
    any process or thread); best effort, silent on any error."""
    if fcntl is None:
        return
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = _temp_pattern(name)
    try:
        entries = [e for e in os.listdir(directory) if pattern.fullmatch(e)]
    except OSError:
        return
    for entry in entries:
        tmp = os.path.join(directory, entry)
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the lock


def _create_locked_temp(directory, name):
    """A new temp file for a save of ``name``, flocked so that no cleanup removes it while we write.
    Returns (path, fd)."""
    while True:
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        # os.open with 0o666 (not mkstemp's 0o600) so the file gets the usual umask-derived mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        if fcntl is None:
            return tmp, fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a cleanup may have taken the lock first and removed the file: then start over
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def atomic_write(path, chunks):
    """Write the buffers ``chunks`` to ``path`` through a temp file in the same directory.

    The temp file is fsynced before ``os.replace`` and removed on any error, so ``path`` holds either
    its old content or the complete new file. OSErrors (permission, missing directory, full disk)
    propagate.  A file object (``BytesIO``, an fsspec file) is written in place at its position;
    atomicity is then the caller's (e.g. fsspec's transaction).  Temp files of earlier saves of
    ``path`` that were killed are removed first.
    """
    if is_file_object(path):
        for chunk in chunks:
            path.write(chunk)
        return
    url = _url(path)
    if url is not None:
        _write_url(*url, chunks)
        return
    path = local_path(path)
    directory, name = os.path.split(os.path.abspath(path))
    remove_stale_temps(path)
    tmp, fd = _create_locked_temp(directory, name)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # before the close releases the lock
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # Make the rename itself durable; best effort (not possible on every platform/filesystem).
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def checked_section(buf, pos, length, crc, name):
    """The ``length`` bytes of ``buf`` at ``pos`` as a memoryview, after checking that they lie
    inside the file and match ``crc`` (CRC32); else IndexFileError naming ``name``."""
    if length > len(buf) - pos:  # before slicing: a huge length must not be trusted
        raise IndexFileError(f"{name} ({length} bytes) runs past the end of the file")
    data = memoryview(buf)[pos:pos + length]
    if zlib.crc32(data) != crc:
        raise IndexFileError(f"{name} checksum mismatch (file corrupted)")
    return data


def _write_url(fs, path, chunks):
    """``atomic_write`` to an fsspec filesystem: a temporary name beside ``path``, then a move (atomic
    where the filesystem's move is; never a half-written file under ``path`` on one that copies)."""
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with fs.open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:   # best effort: the write's own error is the one to report
            pass
        raise
