"""``BFIndex``'s two file formats: ours (``BF_MAGIC``, version, header CRC, then the vectors and the
labels, each ``[uint64 length][uint32 CRC32][data]``) and hnswlib 0.8.0's (its header, then
``max_elements`` records of ``[dim float32 | uint64 label]``).  Written atomically like every index
file; every length, checksum, value and label checked when read.
"""
import struct
import zlib

import numpy as np

from .._core import MAX_CAPACITY, SPACES
from .._errors import IndexFileError
from .._validate import memory_limit
from .files import CRC, atomic_write, checked_section, read_all, source_name

__all__ = ["write_bfindex", "read_bfindex", "bfindex_header", "hnswlib_bfindex_dim", "BF_MAGIC",
           "BF_FORMAT_VERSION"]

# magic, version, space code, dim, max_elements, count, next_auto_id
BF_MAGIC = b"GHNSWBF\0"
BF_FORMAT_VERSION = 1
_BF_HEADER = struct.Struct("<8sIIQQQQ")
_BF_SECTION = struct.Struct("<QI")
# hnswlib's BFIndex: maxelements, size_per_element, cur_element_count, then max_elements records
_BF_HNSW_HEADER = struct.Struct("<QQQ")


def write_bfindex(path, vectors, labels, *, space, max_elements, next_auto_id, format="gpuhnsw"):
    """Save a BFIndex: ``vectors`` float32 [n, dim] (normalised for cosine), ``labels`` uint64 [n].

    format : ``"gpuhnsw"`` (``BF_MAGIC``, version, header CRC, checksummed sections) or
    ``"hnswlib"`` (hnswlib 0.8.0's BFIndex layout: the header, then ``max_elements`` records of
    ``[dim float32 | uint64 label]``). Replaced atomically, like every index file.
    """
    n, dim = vectors.shape
    vec = np.ascontiguousarray(vectors, dtype="<f4")
    lab = np.ascontiguousarray(labels, dtype="<u8")
    if format == "gpuhnsw":
        head = _BF_HEADER.pack(BF_MAGIC, BF_FORMAT_VERSION, SPACES.index(space), dim, max_elements,
                               n, next_auto_id)
        chunks = [head, CRC.pack(zlib.crc32(head))]
        for arr in (vec, lab):
            data = memoryview(arr.reshape(-1).view(np.uint8))
            chunks += [_BF_SECTION.pack(data.nbytes, zlib.crc32(data)), data]
    elif format == "hnswlib":
        rec = np.zeros(max_elements, dtype=_bf_record_dtype(dim))
        rec["v"][:n], rec["l"][:n] = vec, lab
        chunks = [_BF_HNSW_HEADER.pack(max_elements, rec.dtype.itemsize, n),
                  memoryview(rec.view(np.uint8))]
    else:
        raise ValueError(f"format must be 'gpuhnsw' or 'hnswlib', got {format!r}")
    atomic_write(path, chunks)


def _bf_record_dtype(dim):
    return np.dtype([("v", "<f4", (dim,)), ("l", "<u8")])


def bfindex_header(head):
    """(space or None, dim) from the first bytes of a BFIndex file in our format; None if ``head``
    does not start with ``BF_MAGIC``. IndexFileError if the header is truncated or invalid."""
    if head[:len(BF_MAGIC)] != BF_MAGIC:
        return None
    if len(head) < _BF_HEADER.size:
        raise IndexFileError("truncated BFIndex header")
    _, _, code, dim, *_ = _BF_HEADER.unpack_from(head)
    if code >= len(SPACES):
        raise IndexFileError(f"corrupted BFIndex header (space code {code})")
    return SPACES[code], int(dim)


def read_bfindex(path, *, space, dim):
    """Read a BFIndex file in either format (detected by ``BF_MAGIC``).

    Returns a dict: ``max_elements`` (int), ``vectors`` float32 [n, dim], ``labels`` uint64 [n]
    (unique), ``next_auto_id`` (int; ``n`` for hnswlib files), ``format``. Every length, checksum,
    value and label is checked: IndexFileError (naming ``path``) on any inconsistency; OSError if
    the file cannot be read.
    """
    buf = read_all(path)
    path = source_name(path)
    try:
        if buf[:len(BF_MAGIC)] == BF_MAGIC:
            out = _read_bf_own(buf, space, dim)
        else:
            out = _read_bf_hnswlib(buf, dim)
        if not np.isfinite(out["vectors"]).all():
            raise IndexFileError("vectors hold NaN or infinite values")
        if np.unique(out["labels"]).shape[0] != out["labels"].shape[0]:
            raise IndexFileError("duplicate labels")
    except IndexFileError as exc:
        raise IndexFileError(f"{path}: {exc}") from None
    return out


def _read_bf_own(buf, space, dim):
    hs = _BF_HEADER.size
    if len(buf) < hs + CRC.size:
        raise IndexFileError("truncated header")
    _, version, code, fdim, cap, n, next_auto = _BF_HEADER.unpack_from(buf, 0)
    if version != BF_FORMAT_VERSION:
        raise IndexFileError(f"unsupported BFIndex file version {version} (this build reads "
                             f"{BF_FORMAT_VERSION})")
    if zlib.crc32(memoryview(buf)[:hs]) != CRC.unpack_from(buf, hs)[0]:
        raise IndexFileError("header checksum mismatch")
    if code >= len(SPACES):
        raise IndexFileError(f"unknown space code {code}")
    if SPACES[code] != space or fdim != dim:
        raise IndexFileError(f"holds space '{SPACES[code]}', dim {fdim}; this index is space "
                             f"'{space}', dim {dim}")
    if n > cap:
        raise IndexFileError(f"count {n} exceeds capacity {cap}")
    have = memory_limit()
    if cap > MAX_CAPACITY or (have is not None and cap * dim * 4 > have):
        raise IndexFileError(f"capacity {cap} is beyond {MAX_CAPACITY} or the memory this process may use")
    pos = hs + CRC.size
    out = {}
    for name, dtype, width in (("vectors", "<f4", dim), ("labels", "<u8", 1)):
        if len(buf) < pos + _BF_SECTION.size:
            raise IndexFileError(f"truncated before the {name} section")
        nbytes, crc = _BF_SECTION.unpack_from(buf, pos)
        pos += _BF_SECTION.size
        want = n * width * np.dtype(dtype).itemsize
        if nbytes != want:
            raise IndexFileError(f"{name} section holds {nbytes} bytes, expected {want}")
        data = checked_section(buf, pos, nbytes, crc, f"{name} section")
        out[name] = np.frombuffer(data, dtype=dtype)
        pos += nbytes
    if pos != len(buf):
        raise IndexFileError(f"{len(buf) - pos} unexpected trailing bytes")
    return dict(max_elements=int(cap), vectors=out["vectors"].reshape(n, dim).astype(np.float32),
                labels=out["labels"].astype(np.uint64), next_auto_id=int(next_auto),
                format="gpuhnsw")


def _read_bf_hnswlib(buf, dim):
    def bad(msg):
        return IndexFileError(f"not a BFIndex file or corrupted ({msg})")
    hs = _BF_HNSW_HEADER.size
    if len(buf) < hs:
        raise bad(f"shorter than the {hs}-byte header")
    cap, size, n = _BF_HNSW_HEADER.unpack_from(buf, 0)
    rec_dtype = _bf_record_dtype(dim)
    if size != rec_dtype.itemsize:
        raise bad(f"record size {size} does not match dim {dim}")
    if n > cap:
        raise bad(f"count {n} exceeds capacity {cap}")
    if len(buf) != hs + cap * size:
        raise bad(f"file has {len(buf)} bytes, the header implies {hs + cap * size}")
    rec = np.frombuffer(buf, dtype=rec_dtype, count=n, offset=hs)
    return dict(max_elements=int(cap), vectors=rec["v"].astype(np.float32),
                labels=rec["l"].astype(np.uint64), next_auto_id=int(n), format="hnswlib")


def hnswlib_bfindex_dim(head, size):
    """The dim of an hnswlib BFIndex file of ``size`` bytes from its first bytes ``head``, or None
    where they and the size do not fit that format."""
    if len(head) < _BF_HNSW_HEADER.size:
        return None
    cap, rec, n = _BF_HNSW_HEADER.unpack_from(head)
    if rec > 8 and (rec - 8) % 4 == 0 and n <= cap and size == _BF_HNSW_HEADER.size + cap * rec:
        return int((rec - 8) // 4)
    return None
