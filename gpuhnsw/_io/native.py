"""gpuhnsw's own index format (with mapped loads), and ``read_index``, which reads it or hnswlib's.

Both formats are read into, and written from, the state dict (``state.py``).  Nothing read from a
file is trusted: every length is checked against the file size before anything is allocated, every
count and id against its bound, and any inconsistency raises :class:`~gpuhnsw.IndexFileError`
naming the problem.  Writers go through ``files.atomic_write``, so a crash never leaves a
half-written index under the real name.

The format (all little-endian)::

    header   _HEADER (magic b"GPUHNSW\\0", version, scalars; 100 bytes) + uint32 CRC32 of it
    sections links0, degree0, vectors, labels, levels, upper, deleted, in this order, each
             version 2: [4-byte tag][uint64 length][uint32 CRC32 of the data][uint32 pad][pad zero
                        bytes][data], where links0 and vectors start at a multiple of MAP_ALIGN (64) and
                        hold the engine's rows as they are in memory: links0 uint32 [n, 2M] with
                        unused entries 0xFFFFFFFF, vectors float32 [n, dim_pad] (dim_pad =
                        ceil(dim/4)*4, zero padding), so that a load can map them (``map_index``)
             version 1: [4-byte tag][uint64 length][uint32 CRC32 of the data][data], vectors
                        [n, dim]; still read, not mappable
             version 3 (written for a float16 or int8 index, or one with ``rerank``): version 2's
                        sections, where vectors hold the engine's stored rows [n, row_bytes], then
                        STOR (uint32 storage code, uint32 rerank, uint64 clipped rows, uint64 clipped
                        values), QUAN (float32 [2, dim] or empty) and EXAC (the exact rows, float32
                        [n, dim_pad], mappable, or empty)
             version 4 (written with a search graph, ``Index(search_graph="optimized")``): version
                        3's sections, then SGRF: uint32 degree D, uint32 0, the forward entries of
                        each row uint32 [n], the rows uint32 [n, D] (``gpuhnsw._search_graph``)
"""
import contextlib
import mmap
import os
import struct
import zlib

import numpy as np

from .._core import INVALID_SLOT, MAX_GRAPH_DEGREE, SPACES, STORAGES, row_bytes
from .._errors import IndexFileError
from . import hnswlib_format
from .files import CRC, atomic_write, checked_section, local_path, read_all, remove_stale_temps, source_name
from .state import ARRAYS, MAPPABLE, OPTIONAL, arrays_of, check_graph, check_scalars, normalised, validated_arrays

__all__ = ["read_index", "map_index", "write_gpuhnsw", "peek", "FORMAT_VERSION", "MAGIC", "MAP_ALIGN"]

MAGIC = b"GPUHNSW\0"
FORMAT_VERSION = 4    # the newest read; each file is written in the oldest version that holds it
# Mapped sections (links0, vectors, exact) start at multiples of this (a cache line): the engine maps
# the pages around them and reads rows in place.
MAP_ALIGN = 64

# magic, version, space code, allow_replace_deleted, dim, M, ef_construction, random_seed,
# max_elements, count, entry_point, max_level, insert_seq, ef (-1 = not stored)
_HEADER = struct.Struct("<8sIIIQQQQQQqqQq")
HEADER_BYTES = _HEADER.size
_SECTION_V1 = struct.Struct("<4sQI")  # tag, data length, CRC32 of the data
_SECTION = struct.Struct("<4sQII")    # the same, then the zero bytes before the data (version 2)
_TAGS = {"links0": b"LNK0", "degree0": b"DEG0", "vectors": b"VECS", "labels": b"LABL", "levels": b"LEVL",
         "upper": b"UPPR", "deleted": b"DELE"}   # a section per state array, in ARRAYS' order
_TAGS_V3 = {**_TAGS, "storage": b"STOR", "quantizer": b"QUAN", "exact": b"EXAC"}   # then OPTIONAL's
_TAGS_V4 = {**_TAGS_V3, "search_graph": b"SGRF"}
_STORAGE = struct.Struct("<IIQQ")     # STOR: storage code, rerank, clipped rows, clipped values
_GRAPH = struct.Struct("<II")         # SGRF: degree, 0


def _tags(version):
    """{state key: tag} of the sections of a file of ``version``, in file order."""
    return _TAGS_V4 if version >= 4 else _TAGS_V3 if version >= 3 else _TAGS


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def write_gpuhnsw(path, state, *, ef):
    """Save ``state`` in gpuhnsw's own checksummed format (``MAGIC``; version 2 for a float32 index
    without ``rerank``, so that earlier builds read it, else ``FORMAT_VERSION``).

    Parameters
    ----------
    path : str or os.PathLike
        Destination; replaced atomically.
    state : dict
        The state dict (see the module docstring); byte fields may be any contiguous buffer; an
        optional ``"search_graph"``: (forward uint32 [count], rows uint32 [count, D]).
    ef : int or None
        The query-time ``ef`` to store (hnswlib's format does not keep it); None stores nothing.

    Raises
    ------
    ValueError
        If ``state`` is inconsistent (nothing is written).
    OSError
        If the file cannot be written (no temp file is left behind).
    """
    a = validated_arrays(state)
    if ef is not None and (isinstance(ef, bool) or not isinstance(ef, (int, np.integer))
                           or not 0 <= ef < 2**63):
        raise ValueError(f"ef must be None or an int in [0, 2**63), got {ef!r}")
    storage, rerank = state.get("storage", "float32"), bool(state.get("rerank", False))
    graph = state.get("search_graph")
    version = 4 if graph is not None else 2 if storage == "float32" and not rerank else 3
    header = _HEADER.pack(
        MAGIC, version, SPACES.index(state["space"]), bool(state["allow_replace_deleted"]),
        state["dim"], state["M"], state["ef_construction"], state["random_seed"],
        state["max_elements"], state["count"], state["entry_point"], state["max_level"],
        state["insert_seq"], -1 if ef is None else ef)
    chunks = [header, CRC.pack(zlib.crc32(header))]
    pos = len(header) + CRC.size
    # the mappable sections hold the engine's rows (see the module docstring)
    a["links0"], _ = normalised(a, state["M"])
    dim = state["dim"]
    if storage == "float32":
        a["vectors"] = _padded(a["vectors"], dim)
    if version >= 3:
        a["storage"] = np.frombuffer(_STORAGE.pack(STORAGES.index(storage), rerank, state.get("clipped_rows", 0),
                                                   state.get("clipped_values", 0)), dtype=np.uint8)
        a["exact"] = _padded(a["exact"], dim) if rerank else np.zeros(0, np.float32)
        if a["quantizer"] is None:
            a["quantizer"] = np.zeros(0, np.float32)
    if version >= 4:
        forward, rows = graph
        if rows.shape != (state["count"], rows.shape[1]) or forward.shape != (state["count"],):
            raise ValueError(f"search_graph: rows {rows.shape} and forward {forward.shape} for {state['count']} rows")
        a["search_graph"] = np.concatenate([np.frombuffer(_GRAPH.pack(rows.shape[1], 0), np.uint8),
                                            np.ascontiguousarray(forward, np.uint32).view(np.uint8),
                                            np.ascontiguousarray(rows, np.uint32).reshape(-1).view(np.uint8)])
    for key, tag in _tags(version).items():
        data = memoryview(a[key].reshape(-1).view(np.uint8))
        pos += _SECTION.size
        pad = -pos % MAP_ALIGN if key in MAPPABLE else 0
        chunks += [_SECTION.pack(tag, data.nbytes, zlib.crc32(data), pad), bytes(pad), data]
        pos += pad + data.nbytes
    atomic_write(path, chunks)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def read_index(path, *, space, dim):
    """Read an index file in either format, detected by its first bytes.

    Parameters
    ----------
    path : str, os.PathLike, or a binary file object (read from its position to the end)
    space : {'l2', 'ip', 'cosine'}
        The caller's space. Our format stores it and must agree; hnswlib files do not store it.
    dim : int
        The caller's dimension; must agree with the file (derived from the offsets for hnswlib).

    Returns
    -------
    state : dict
        The state dict (byte fields are ``bytes``). For hnswlib files ``random_seed`` is 100,
        ``insert_seq`` is ``count`` and ``allow_replace_deleted`` is False (the caller overrides it).
    ef : int or None
        The stored query ``ef``; None for hnswlib files (hnswlib loads with ``ef=10``).
    fmt : {'gpuhnsw', 'hnswlib'}

    Raises
    ------
    IndexFileError
        The file is truncated, corrupted, unsupported, or does not match ``space``/``dim``; the
        message starts with the file's name.
    OSError
        The file cannot be opened or read.
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    buf = read_all(path)
    fmt = "gpuhnsw" if buf[:len(MAGIC)] == MAGIC else "hnswlib"   # hnswlib's files have no magic
    try:
        if not buf:
            raise IndexFileError("index file is empty")
        if fmt == "gpuhnsw":
            state, ef = _read_gpuhnsw(buf, space, dim)
            return state, ef, fmt
        return hnswlib_format.read(buf, space, dim), None, fmt
    except IndexFileError as exc:
        where = f" (read as {fmt}'s format)" if buf else ""
        raise IndexFileError(f"{source_name(path)}{where}: {exc}") from None


@contextlib.contextmanager
def map_index(path, *, space, dim, verify=False):
    """Open an index file in our format (version 2 or 3) for a mapped load.

    Yields ``(state, ef, mapping)``: the state dict with ``vectors``, ``links0`` (and with rerank
    ``exact``) None, the stored ``ef`` (or None), and the keyword arguments of
    ``_core.Core.from_state`` that map those sections from the open file (``fd``, ``vectors_offset``,
    ``links0_offset``, ``exact_offset``); the file is closed when the block ends (a mapping keeps its
    own reference to the file).

    Verified here: the header, every section's bounds, the CRC32 of every section but ``vectors``
    and the invariants ``read_index`` checks; the engine range-checks ``links0`` as it adopts the
    mapping (its integrity check).  The rows are not read (that is what makes the load fast), or
    checksummed and checked for NaN/inf, zero padding and int8 row terms with ``verify=True`` (one
    read of them).

    Raises
    ------
    IndexFileError
        As ``read_index``; also for a file that cannot be mapped (hnswlib's format, version 1,
        sections not aligned to this machine's pages), saying to load it without mmap.
    ValueError
        ``path`` is a file object (only a file on disk can be mapped).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    local = local_path(path)
    if local is None:
        raise ValueError("mmap=True needs a local file (a path or a file:// URL): a file object or a remote "
                         "URL cannot be mapped")
    remove_stale_temps(local)
    with open(local, "rb") as f:
        try:
            state, ef, mapping = _map_gpuhnsw(f.fileno(), space, dim, verify)
        except IndexFileError as exc:
            raise IndexFileError(f"{source_name(path)}: {exc}") from None
        yield state, ef, mapping


def _parse_header(head, space, dim):
    """(state scalars, ef, version) from the first bytes of a file in our format."""
    hsize = _HEADER.size + CRC.size
    if len(head) < hsize:
        raise IndexFileError(f"gpuhnsw file truncated in the header ({len(head)} bytes)")
    fields = _HEADER.unpack_from(head)
    (_, version, space_code, allow_replace, fdim, M, ef_c, seed, max_elements, n, ep, max_level,
     insert_seq, ef) = fields
    if not 1 <= version <= FORMAT_VERSION:
        raise IndexFileError(f"unsupported gpuhnsw file version {version} (this build reads 1 to "
                             f"{FORMAT_VERSION})")
    if CRC.unpack_from(head, _HEADER.size)[0] != zlib.crc32(memoryview(head)[:_HEADER.size]):
        raise IndexFileError("gpuhnsw header checksum mismatch (file corrupted)")
    if space_code >= len(SPACES) or allow_replace > 1 or ef < -1 or ef == 0:   # (set_ef refuses 0)
        raise IndexFileError("gpuhnsw header has invalid space code, flag or ef")
    if SPACES[space_code] != space:
        raise IndexFileError(f"index file space is {SPACES[space_code]!r}, the index's is {space!r}")
    if fdim != dim:
        raise IndexFileError(f"index file dim is {fdim}, the index's is {dim}")
    state = dict(space=space, dim=dim, M=M, ef_construction=ef_c, random_seed=seed,
                 allow_replace_deleted=bool(allow_replace), max_elements=max_elements, count=n,
                 entry_point=ep, max_level=max_level, insert_seq=insert_seq)
    check_scalars(state, IndexFileError)
    return state, None if ef == -1 else ef, version


def _section_layout(read, size, version):
    """{state key: (offset, length, crc)} of the sections of a file of ``size`` bytes in our format,
    from the section headers alone (``read(pos, n) -> bytes``): each in order, inside the file,
    nothing after the last."""
    fmt = _SECTION if version >= 2 else _SECTION_V1
    pos = _HEADER.size + CRC.size
    out = {}
    for key, tag in _tags(version).items():
        head = read(pos, fmt.size)
        if len(head) < fmt.size:
            raise IndexFileError(f"gpuhnsw file truncated before section {tag.decode()}")
        ftag, length, crc, *pad = fmt.unpack_from(head)
        if ftag != tag:
            raise IndexFileError(f"expected section {tag.decode()}, found {ftag!r}")
        pos += fmt.size
        if pad and (pad[0] >= MAP_ALIGN or read(pos, pad[0]) != bytes(pad[0])):
            raise IndexFileError(f"section {tag.decode()}: bad padding before the data")
        pos += sum(pad)
        if pos > size or length > size - pos:  # before reading: a huge length must not be trusted
            raise IndexFileError(f"section {tag.decode()} ({length} bytes) runs past the end of the file")
        out[key] = (pos, length, crc)
        pos += length
    if pos != size:
        raise IndexFileError(f"{size - pos} unexpected bytes after the last section")
    return out


def _dim_pad(dim):
    """The engine's row width in floats (``dim_pad`` of gpuhnsw.h): rows of 16 bytes."""
    return -(-dim // 4) * 4


def _padded(rows, dim):
    """float32 [n, dim] rows as the engine's float32 [n, dim_pad] (zero padding)."""
    if dim % 4 == 0:
        return rows
    padded = np.zeros((rows.shape[0], _dim_pad(dim)), dtype=np.float32)
    padded[:, :dim] = rows
    return padded


def _unpadded(vectors, n, dim, name="section VECS"):
    """Float32 rows of a file (bytes-like [n, dim_pad]) as the state's float32 [n, dim] bytes."""
    if len(vectors) != n * 4 * _dim_pad(dim):
        raise IndexFileError(f"{name}: {len(vectors)} bytes, expected {n * 4 * _dim_pad(dim)}")
    if dim % 4 == 0:
        return vectors
    return np.frombuffer(vectors, dtype=np.float32).reshape(n, _dim_pad(dim))[:, :dim].tobytes()


def _storage_fields(data):
    """The state fields of a STOR section (bytes): storage, rerank, clip counters."""
    if len(data) != _STORAGE.size:
        raise IndexFileError(f"section STOR: {len(data)} bytes, expected {_STORAGE.size}")
    code, rerank, clipped_rows, clipped_values = _STORAGE.unpack(data)
    if code >= len(STORAGES) or rerank > 1:
        raise IndexFileError(f"section STOR: storage code {code}, rerank flag {rerank}")
    return dict(storage=STORAGES[code], rerank=bool(rerank), clipped_rows=clipped_rows,
                clipped_values=clipped_values)


def _search_graph(data, count):
    """(forward uint32 [count], rows uint32 [count, D]) of an SGRF section (bytes-like), checked:
    D in [1, MAX_GRAPH_DEGREE], forward counts <= D, each row's valid entries a prefix of slots
    below ``count``, none its own (read in place: the caller copies what it keeps)."""
    if len(data) < _GRAPH.size:
        raise IndexFileError(f"section SGRF: {len(data)} bytes, too short")
    degree, zero = _GRAPH.unpack_from(data)
    if not 1 <= degree <= MAX_GRAPH_DEGREE or zero or len(data) != _GRAPH.size + 4 * count * (1 + degree):
        raise IndexFileError(f"section SGRF: degree {degree}, {len(data)} bytes for {count} rows")
    forward = np.frombuffer(data, np.uint32, count, _GRAPH.size)
    rows = np.frombuffer(data, np.uint32, count * degree, _GRAPH.size + 4 * count).reshape(count, degree)
    valid = rows != INVALID_SLOT
    bad = (forward > valid.sum(axis=1)) | (valid[:, 1:] & ~valid[:, :-1]).any(axis=1) | \
        (valid & ((rows >= count) | (rows == np.arange(count, dtype=np.uint32)[:, None]))).any(axis=1)
    if bad.any():
        raise IndexFileError(f"section SGRF: row {int(np.flatnonzero(bad)[0])} is not a search-graph row")
    return forward, rows


def _finished(state, M):
    """``state`` whose sections were read (None: mapped) after the graph checks, with unused link
    entries normalised, byte fields as ``bytes``."""
    a = arrays_of(state, IndexFileError)
    check_graph(a, M=M, entry_point=state["entry_point"], max_level=state["max_level"], err=IndexFileError)
    links0, upper = normalised(a, M)
    state.update({key: bytes(state[key]) for key, _ in ARRAYS + OPTIONAL if state.get(key) is not None})
    if "search_graph" in state:
        state["search_graph"] = _search_graph(state["search_graph"], state["count"])
    state["upper"] = upper.tobytes()
    if links0 is not None:
        state["links0"] = links0.tobytes()
    return state


def _read_gpuhnsw(buf, space, dim):
    state, ef, version = _parse_header(buf[:_HEADER.size + CRC.size], space, dim)
    layout = _section_layout(lambda pos, n: buf[pos:pos + n], len(buf), version)
    for key, tag in _tags(version).items():
        state[key] = checked_section(buf, *layout[key], f"section {tag.decode()}")
    if version >= 3:
        state.update(_storage_fields(bytes(state.pop("storage"))))
        if state["rerank"]:
            state["exact"] = _unpadded(state["exact"], state["count"], dim, "section EXAC")
    if version >= 2 and state.get("storage", "float32") == "float32":
        state["vectors"] = _unpadded(state["vectors"], state["count"], dim)
    return _finished(state, state["M"]), ef


def _map_gpuhnsw(fd, space, dim, verify):
    """(state, ef, Core.from_state mapping keywords) of the open file ``fd`` (see ``map_index``)."""
    size = os.fstat(fd).st_size

    def read(pos, n):
        return os.pread(fd, n, pos)

    head = read(0, _HEADER.size + CRC.size)
    if head[:len(MAGIC)] != MAGIC:
        raise IndexFileError("not in gpuhnsw's own format (an hnswlib file?): it cannot be mapped; load it "
                             "without mmap, and save it to map it next time")
    state, ef, version = _parse_header(head, space, dim)
    if version < 2:
        raise IndexFileError(f"a version {version} file cannot be mapped; load it without mmap, and save it "
                             "to map it next time")
    layout = _section_layout(read, size, version)
    n = state["count"]
    tags = _tags(version)
    for key, tag in tags.items():   # what is read (the storage first: the mapped rows' size depends on it)
        if key not in MAPPABLE:
            off, length, crc = layout[key]
            state[key] = checked_section(read(off, length), 0, length, crc, f"section {tag.decode()}")
    if version >= 3:
        state.update(_storage_fields(bytes(state.pop("storage"))))
    storage, rerank = state.get("storage", "float32"), state.get("rerank", False)
    quantizer = np.frombuffer(state["quantizer"], np.float32) if version >= 3 else np.zeros(0, np.float32)
    rows = {"links0": 8 * state["M"], "vectors": row_bytes(dim, storage), "exact": 4 * _dim_pad(dim) if rerank else 0}
    for key, tag in tags.items():
        if key not in MAPPABLE:
            continue
        off, length, crc = layout[key]
        name = f"section {tag.decode()}"
        if length != n * rows[key]:
            raise IndexFileError(f"{name}: {length} bytes, expected {n * rows[key]} for {n} rows")
        if key == "links0" or verify:
            _check_mapped(fd, off, length, crc, name, None if key == "links0" else
                          _row_check("float32" if key == "exact" else storage, dim, space, quantizer))
        state[key] = None
    mapping = dict(fd=fd, vectors_offset=layout["vectors"][0], links0_offset=layout["links0"][0])
    if rerank:
        mapping["exact_offset"] = layout["exact"][0]
    return _finished(state, state["M"]), ef, mapping


def _row_check(storage, dim, space, quantizer):
    """A check of mapped rows of ``storage`` (bytes-like -> None, or what is wrong): finite values and
    zero padding, and for int8 the per-row term of each row recomputed from its codes (gpuhnsw.h)."""
    def check(data):
        if storage == "float32":
            rows = np.frombuffer(data, dtype=np.float32).reshape(-1, _dim_pad(dim))
            if not np.isfinite(rows).all() or rows[:, dim:].any():
                return "NaN, inf or non-zero padding"
        elif storage == "float16":
            rows = np.frombuffer(data, dtype=np.uint16).reshape(-1, row_bytes(dim, storage) // 2)
            if ((rows[:, :dim] & 0x7C00) == 0x7C00).any() or rows[:, dim:].any():
                return "float16 NaN, inf or non-zero padding"
        else:
            width = row_bytes(dim, storage)
            rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
            if rows[:, dim:width - 4].any():
                return "non-zero padding of the int8 codes"
            if rows.shape[0] and quantizer.size != 2 * dim:
                return "int8 rows without their quantizer"
            if rows.shape[0]:
                offset, scale = quantizer.reshape(2, dim).astype(np.float64)
                codes = rows[:, :dim].view(np.int8).astype(np.float64)
                terms = (scale * codes) ** 2 if space == "l2" else offset * scale * codes
                want, have = terms.sum(axis=1), rows[:, width - 4:].copy().view(np.float32)[:, 0]
                if not np.all(np.abs(have - want) <= 1e-5 * np.abs(terms).sum(axis=1) + 1e-30):
                    return "int8 row terms do not match their codes"
        return None
    return check


def _check_mapped(fd, off, length, crc, name, check):
    """CRC32 of ``length`` bytes of ``fd`` at ``off``, read through a mapping (the page cache, no
    private copy), and ``check(data)`` (None, or a description of what is wrong) where given."""
    if not length:
        ok = zlib.crc32(b"") == crc
    else:
        start = off - off % mmap.ALLOCATIONGRANULARITY   # mappings start at page boundaries
        with mmap.mmap(fd, off - start + length, offset=start, access=mmap.ACCESS_READ) as mm:
            data = memoryview(mm)[off - start:]
            ok = zlib.crc32(data) == crc
            bad = check(data) if ok and check is not None else None
            data.release()  # before the mapping closes
            if bad:
                raise IndexFileError(f"{name}: {bad}")
    if not ok:
        raise IndexFileError(f"{name} checksum mismatch (file corrupted)")


def peek(head):
    """(space, dim) of a file in our format from its first ``HEADER_BYTES`` bytes ``head``, or None
    where they do not start with ``MAGIC``; IndexFileError for a truncated or invalid header."""
    if head[:len(MAGIC)] != MAGIC:
        return None
    if len(head) < _HEADER.size:
        raise IndexFileError("truncated gpuhnsw index header")
    fields = _HEADER.unpack_from(head)
    code, dim = fields[2], fields[4]
    if code >= len(SPACES):
        raise IndexFileError(f"corrupted gpuhnsw index header (space code {code})")
    return SPACES[code], int(dim)
