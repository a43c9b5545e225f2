"""Index files: gpuhnsw's own format and hnswlib 0.8.0's ``save_index`` format.

Both readers produce, and both writers take, the state dict of docs/architecture.md ("State export /
import"): scalars plus byte strings

=========  ===========================================  ==========================================
key        dtype, shape                                 notes
=========  ===========================================  ==========================================
vectors    float32 ``[n, dim]``                         normalised for cosine
links0     uint32 ``[n, 2M]``                           unused entries ``0xFFFFFFFF``
degree0    uint32 ``[n]``                               live entries of each ``links0`` row
labels     uint64 ``[n]``                               unique
levels     uint8 ``[n]``                                top level of each slot
upper      uint32 ``[sum(levels) * (1 + M)]``           per slot, per level 1..L: ``[count, M ids]``
deleted    uint8 ``[n]``                                0/1
=========  ===========================================  ==========================================

Nothing read from a file is trusted: every length is checked against the file size before anything
is allocated, every count and id against its bound, and any inconsistency raises
:class:`~gpuhnsw.IndexFileError` naming the problem. Writers go through a temporary file in the same
directory and ``os.replace``, so a crash never leaves a half-written index under the real name.

Our format (all little-endian)::

    header   _HEADER (magic b"GPUHNSW\\0", version, scalars; 100 bytes) + uint32 CRC32 of it
    sections links0, degree0, vectors, labels, levels, upper, deleted, in this order, each
             version 2: [4-byte tag][uint64 length][uint32 CRC32 of the data][uint32 pad][pad zero
                        bytes][data], where links0 and vectors start at a multiple of MAP_ALIGN (64) and
                        hold the engine's rows as they are in memory: links0 uint32 [n, 2M] with
                        unused entries 0xFFFFFFFF, vectors float32 [n, dim_pad] (dim_pad =
                        ceil(dim/4)*4, zero padding), so that a load can map them (``map_index``)
             version 1: [4-byte tag][uint64 length][uint32 CRC32 of the data][data], vectors
                        [n, dim]; still read, not mappable
"""
import contextlib
import math
import mmap
import os
import re
import struct
import uuid
import zlib

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock, so stale temp files are not cleaned up there
    fcntl = None

# The engine's limits have one home (gpuhnsw/csrc/gpuhnsw.h).  SPACES: position = space code in our
# header; NO_LINK: unused link entry in the state; MAX_M: hnswlib's init_index cap (no real file has
# more); MAX_LEVEL: levels are uint8.
from ._core import (INVALID_SLOT as NO_LINK, MAX_CAPACITY, MAX_DIM, MAX_EF_CONSTRUCTION, MAX_LEVEL, MAX_M,
                    SPACES)
from ._errors import IndexFileError
from ._validate import memory_limit, thread_limit

__all__ = ["read_index", "map_index", "write_gpuhnsw", "write_hnswlib", "FORMAT_VERSION", "MAGIC",
           "read_bfindex", "write_bfindex", "bfindex_header", "BF_MAGIC", "BF_FORMAT_VERSION"]

MAGIC = b"GPUHNSW\0"
FORMAT_VERSION = 2
# Mapped sections (links0, vectors) start at multiples of this (a cache line): the engine maps the
# pages around them and reads rows in place, which needs 16-byte rows.
MAP_ALIGN = 64

# magic, version, space code, allow_replace_deleted, dim, M, ef_construction, random_seed,
# max_elements, count, entry_point, max_level, insert_seq, ef (-1 = not stored)
_HEADER = struct.Struct("<8sIIIQQQQQQqqQq")
_CRC = struct.Struct("<I")
_SECTION_V1 = struct.Struct("<4sQI")  # tag, data length, CRC32 of the data
_SECTION = struct.Struct("<4sQII")    # the same, then the zero bytes before the data (version 2)
_MAPPED = ("links0", "vectors")        # the sections a load may map
_SECTIONS = (  # (state key, tag, dtype); the order is the file order
    ("links0", b"LNK0", np.uint32),
    ("degree0", b"DEG0", np.uint32),
    ("vectors", b"VECS", np.float32),
    ("labels", b"LABL", np.uint64),
    ("levels", b"LEVL", np.uint8),
    ("upper", b"UPPR", np.uint32),
    ("deleted", b"DELE", np.uint8),
)

# BFIndex files (see "BFIndex files" below): magic, version, space code, dim, max_elements, count,
# next_auto_id; then sections [uint64 length][uint32 CRC32][data] for vectors and labels.
BF_MAGIC = b"GHNSWBF\0"
BF_FORMAT_VERSION = 1
_BF_HEADER = struct.Struct("<8sIIQQQQ")
_BF_SECTION = struct.Struct("<QI")
# hnswlib's BFIndex: maxelements, size_per_element, cur_element_count, then max_elements records
_BF_HNSW_HEADER = struct.Struct("<QQQ")

# hnswlib's header: offsetLevel0, max_elements, cur_element_count, size_data_per_element,
# label_offset, offsetData, maxlevel, enterpoint_node, maxM, maxM0, M, mult, ef_construction
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_HNSW_RANDOM_SEED = 100  # hnswlib files do not store the seed; hnswlib's default


# ---------------------------------------------------------------------------------------------
# validation shared by readers and writers
# ---------------------------------------------------------------------------------------------

def _arrays_from_state(state, err):
    """View the byte-string fields of ``state`` as typed numpy arrays (no copy), checking sizes.

    Returns a dict with ``vectors`` float32 [n, dim], ``links0`` uint32 [n, 2M], ``degree0`` uint32
    [n], ``labels`` uint64 [n], ``levels`` uint8 [n], ``upper`` uint32 [sum(levels) * (1 + M)],
    ``deleted`` uint8 [n]. ``err`` is the exception class to raise.  A field that is None (mapped
    from a file, see ``map_index``) stays None.
    """
    n, dim, M = state["count"], state["dim"], state["M"]
    shapes = {"links0": (n, 2 * M), "degree0": (n,), "vectors": (n, dim), "labels": (n,),
              "levels": (n,), "deleted": (n,)}
    out = {}
    for key, _, dtype in _SECTIONS:
        if state[key] is None and key in _MAPPED:
            out[key] = None
            continue
        try:
            raw = np.frombuffer(state[key], dtype=np.uint8)
        except (TypeError, ValueError) as e:  # not a contiguous buffer
            raise err(f"state field {key!r} is not a contiguous byte buffer: {e}") from None
        if key == "upper":  # its length depends on the levels, checked below
            shape = (raw.size // 4,)
            if raw.size % 4:
                raise err(f"upper: {raw.size} bytes is not a whole number of uint32")
        else:
            shape = shapes[key]
            want = math.prod(shape) * np.dtype(dtype).itemsize
            if raw.size != want:
                raise err(f"{key}: {raw.size} bytes, expected {want} for shape {shape}")
        out[key] = raw.view(dtype).reshape(shape)
    return out


def _check_graph(a, *, M, entry_point, max_level, err):
    """Check the graph invariants the C core and the GPU kernels rely on.

    ``a`` is the dict of :func:`_arrays_from_state`; unused link entries may hold anything (only the
    first ``count`` of each list are read); mapped ``links0`` (None) is checked by the engine as it
    adopts the mapping. Raises ``err`` naming the first problem found.
    """
    n = a["degree0"].shape[0]
    M0 = 2 * M
    if n and int(a["degree0"].max()) > M0:
        i = int(np.argmax(a["degree0"] > M0))
        raise err(f"level-0 link count {int(a['degree0'][i])} of slot {i} exceeds M0={M0}")
    used0 = np.arange(M0, dtype=np.uint32)[None, :] < a["degree0"][:, None]
    if n and a["links0"] is not None and int(a["links0"][used0].max(initial=0)) >= n:
        raise err(f"level-0 link id out of range (count={n})")
    if n and int(a["deleted"].max()) > 1:
        raise err("deleted flags must be 0 or 1")
    if n > 1:
        s = np.sort(a["labels"])
        if np.any(s[1:] == s[:-1]):
            raise err(f"duplicate label {int(s[1:][s[1:] == s[:-1]][0])}")
    levels = a["levels"]
    blocks_per_slot = levels.astype(np.int64)
    if a["upper"].size != int(blocks_per_slot.sum()) * (1 + M):
        raise err(f"upper: {a['upper'].size} uint32, levels need {int(blocks_per_slot.sum()) * (1 + M)}")
    blocks = a["upper"].reshape(-1, 1 + M)
    counts = blocks[:, 0]
    if blocks.shape[0] and int(counts.max()) > M:
        raise err(f"upper-level link count {int(counts.max())} exceeds M={M}")
    # The level of each block: a slot of level L owns blocks for levels 1..L, in order.
    first = np.repeat(np.cumsum(blocks_per_slot) - blocks_per_slot, blocks_per_slot)
    block_level = np.arange(blocks.shape[0]) - first + 1
    used = np.arange(M, dtype=np.uint32)[None, :] < counts[:, None]
    ids = blocks[:, 1:][used]
    if ids.size:
        if int(ids.max()) >= n:
            raise err(f"upper-level link id out of range (count={n})")
        # A neighbour at level l must itself exist at level l, or the descent reads past its lists.
        if np.any(levels[ids] < np.broadcast_to(block_level[:, None], used.shape)[used]):
            raise err("upper-level link to a slot that does not reach that level")
    if n == 0:
        if entry_point != -1 or max_level != -1:
            raise err(f"empty index with entry point {entry_point}, max level {max_level}")
    else:
        if not 0 <= entry_point < n:
            raise err(f"entry point {entry_point} out of range (count={n})")
        if max_level != int(levels[entry_point]) or max_level != int(levels.max()):
            raise err(f"max level {max_level} is not the entry point's level "
                      f"{int(levels[entry_point])} / the highest level {int(levels.max())}")


def _normalised(a, M):
    """Copies of ``links0`` (None stays None) and ``upper`` with every unused entry set to ``NO_LINK``."""
    links0 = None if a["links0"] is None else a["links0"].copy()
    if links0 is not None:
        links0[np.arange(2 * M)[None, :] >= a["degree0"][:, None]] = NO_LINK
    upper = a["upper"].copy()
    blocks = upper.reshape(-1, 1 + M)
    blocks[:, 1:][np.arange(M)[None, :] >= blocks[:, :1]] = NO_LINK
    return links0, upper


def _check_int(state, key, lo, hi, err):
    v = state[key]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise err(f"{key} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise err(f"{key}={v} outside [{lo}, {hi}]")


def _check_scalars(state, err):
    """Range-check the scalar fields of ``state`` (their types and bounds): the engine's limits, so
    whatever passes here also loads, and saves again."""
    if state["space"] not in SPACES:
        raise err(f"space must be one of {SPACES}, got {state['space']!r}")
    for key, lo, hi in (("dim", 1, MAX_DIM), ("M", 2, MAX_M), ("ef_construction", 0, MAX_EF_CONSTRUCTION),
                        ("random_seed", 0, 2**64 - 1), ("max_elements", 0, MAX_CAPACITY),
                        ("max_level", -1, MAX_LEVEL), ("insert_seq", 0, 2**64 - 1)):
        _check_int(state, key, lo, hi, err)
    _check_int(state, "count", 0, state["max_elements"], err)
    _check_int(state, "entry_point", -1, state["count"] - 1, err)


def check_state(state):
    """Check a pickled or ``Index(dict)`` state before anything is built from it and return the
    state to build from: ours as it is, or hnswlib 0.8.0's (its ``__getstate__()[0]``, recognised by
    ``data_level0``) converted by :func:`state_from_hnswlib`.  Checked: the Index fields (``space``,
    ``dim``, ``ef``, ``num_threads``, ``cur_l``, ``index_inited``, ``auto_resize``, ``ser_version``)
    and, for an initialised index, that every core field is there and its scalars in range.  Raises
    :class:`IndexFileError` naming the field (array contents are checked by the engine's import)."""
    if not isinstance(state, dict):
        raise IndexFileError(f"index state must be a dict, got {type(state).__name__}")
    if "data_level0" in state:
        state = state_from_hnswlib(state)
    defaults = dict(ser_version=1, ef=10, num_threads=1, cur_l=0, index_inited=True)
    full = {**defaults, **state}
    missing = [key for key in ("space", "dim") if key not in state]
    if missing:
        raise IndexFileError(f"index state lacks {', '.join(missing)}")
    version = full["ser_version"]
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)) or version != 1:
        raise IndexFileError(f"ser_version={version!r}: unsupported state version")
    if full["space"] not in SPACES:
        raise IndexFileError(f"space must be one of {SPACES}, got {full['space']!r}")
    for key, lo, hi in (("dim", 1, MAX_DIM), ("ef", 0, 2**63 - 1), ("num_threads", -2**31, thread_limit()),
                        ("cur_l", 0, 2**64 - 1)):
        _check_int(full, key, lo, hi, IndexFileError)
    for key in ("index_inited", "auto_resize"):
        if key in full and not isinstance(full[key], (bool, np.bool_)):
            raise IndexFileError(f"{key} must be a bool, got {type(full[key]).__name__}")
    if not full["index_inited"]:
        return state
    # an initialised index without its arrays would come back empty: refuse it
    missing = [key for key in ("M", "ef_construction", "random_seed", "max_elements", "count", "entry_point",
                               "max_level", "insert_seq", "allow_replace_deleted") + tuple(k for k, _, _ in _SECTIONS)
               if key not in state]
    if missing:
        raise IndexFileError(f"index state lacks {', '.join(missing)} (an initialised index needs them all; "
                             "pass index_inited=False for an empty one)")
    if not isinstance(state["allow_replace_deleted"], (bool, np.bool_)):
        raise IndexFileError("allow_replace_deleted must be a bool")
    _check_scalars(state, IndexFileError)
    return state


# the fields of hnswlib 0.8.0's pickle state that state_from_hnswlib reads
_HNSW_STATE_INTS = ("dim", "num_threads", "seed", "ef", "offset_level0", "max_elements", "cur_element_count",
                    "size_data_per_element", "label_offset", "offset_data", "max_level", "enterpoint_node",
                    "max_M", "max_M0", "M", "ef_construction", "size_links_per_element")
_HNSW_STATE_ARRAYS = {"label_lookup_external": np.uint64, "label_lookup_internal": np.uint32,
                      "element_levels": np.int32, "data_level0": np.int8, "link_lists": np.int8}


def state_from_hnswlib(h):
    """Our state from hnswlib 0.8.0's pickle state ``h`` (``hnswlib.Index.__getstate__()[0]``).

    The level-0 records and link blocks are hnswlib's file layout without the per-element size
    words, so they are put back in file order and read by the hnswlib file reader (every check of a
    file applies); the label map, levels, ``seed``, ``ef`` and ``num_threads`` hnswlib also keeps are
    checked against them or carried over.  Raises :class:`IndexFileError` naming the field."""
    err = IndexFileError
    missing = [k for k in ("ser_version", "space", "index_inited", *_HNSW_STATE_INTS, "mult",
                           "allow_replace_deleted", *_HNSW_STATE_ARRAYS) if k not in h]
    if h.get("index_inited") is False:   # an uninitialised hnswlib index pickles its parameters only
        missing = [k for k in ("ser_version", "space", "dim") if k not in h]
    if missing:
        raise err(f"hnswlib index state lacks {', '.join(missing)}")
    if h["ser_version"] != 1:
        raise err(f"hnswlib index state: ser_version={h['ser_version']!r}, only 1 (hnswlib 0.8.0) is known")
    if not isinstance(h["index_inited"], (bool, np.bool_)):
        raise err("hnswlib index state: index_inited must be a bool")
    ours = dict(space=h["space"], dim=h["dim"], ser_version=1, index_inited=bool(h["index_inited"]))
    for key in ("ef", "num_threads"):
        if key in h:
            ours[key] = h[key]
    if not h["index_inited"]:
        return ours
    for key in _HNSW_STATE_INTS:
        _check_int(h, key, -2**63, 2**64 - 1, err)
    if h["space"] not in SPACES:
        raise err(f"space must be one of {SPACES}, got {h['space']!r}")
    if not isinstance(h["allow_replace_deleted"], (bool, np.bool_)):
        raise err("hnswlib index state: allow_replace_deleted must be a bool")
    arrays = {}
    for key, dtype in _HNSW_STATE_ARRAYS.items():
        a = h[key]
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != dtype:
            raise err(f"hnswlib index state: {key} must be a 1-d {np.dtype(dtype).name} array")
        arrays[key] = a
    n, M, per_elem = h["cur_element_count"], h["M"], h["size_data_per_element"]
    if not 0 <= n <= min(h["max_elements"], MAX_CAPACITY) or not 2 <= M <= MAX_M:
        raise err(f"hnswlib index state: cur_element_count={n}, max_elements={h['max_elements']}, M={M}")
    if h["size_links_per_element"] != 4 * (1 + M):
        raise err(f"hnswlib index state: size_links_per_element={h['size_links_per_element']}, "
                  f"expected {4 * (1 + M)}")
    levels = arrays["element_levels"]
    if levels.size != h["max_elements"] or (n and not 0 <= levels[:n].min() <= levels[:n].max() <= MAX_LEVEL):
        raise err("hnswlib index state: element_levels must hold max_elements levels within "
                  f"[0, {MAX_LEVEL}]")
    words = levels[:n].astype(np.int64) * (1 + M)                     # [n] uint32 words of each link list
    level0, links = arrays["data_level0"], arrays["link_lists"]
    if level0.size != n * per_elem or links.size != 4 * int(words.sum()):
        raise err(f"hnswlib index state: data_level0 holds {level0.size} bytes and link_lists {links.size}, "
                  f"expected {n * per_elem} and {4 * int(words.sum())}")
    try:
        head = _HNSW_HEADER.pack(h["offset_level0"], h["max_elements"], n, per_elem, h["label_offset"],
                                 h["offset_data"], h["max_level"], h["enterpoint_node"] & 0xFFFFFFFF, h["max_M"],
                                 h["max_M0"], M, float(h["mult"]), h["ef_construction"])
    except (struct.error, TypeError, ValueError) as exc:
        raise err(f"hnswlib index state: a header field is out of range ({exc})") from None
    tail = np.empty(n + int(words.sum()), dtype="<u4")                # file order: [size word][blocks] each
    at = np.arange(n) + np.cumsum(words) - words
    is_size = np.zeros(tail.size, dtype=bool)
    is_size[at] = True
    tail[at] = 4 * words
    tail[~is_size] = links.view("<u4")
    state = _read_hnswlib(head + level0.tobytes() + tail.tobytes(), h["space"], h["dim"])
    labels = np.frombuffer(state["labels"], np.uint64)
    external, internal = arrays["label_lookup_external"], arrays["label_lookup_internal"]
    if (external.size != n or internal.size != n or (n and internal.max() >= n)
            or not np.array_equal(labels[internal], external)):
        raise err("hnswlib index state: label_lookup does not match the labels of the stored elements")
    _check_int(h, "seed", 0, 2**64 - 1, err)
    state.update(ours, random_seed=h["seed"], allow_replace_deleted=bool(h["allow_replace_deleted"]))
    return state


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def is_file_object(target):
    """A file-like object (``BytesIO``, an open file, an fsspec file) rather than a path."""
    return hasattr(target, "write") or hasattr(target, "read")


def source_name(target):
    """How error messages name ``target``: the path, or a file object's name (or its type)."""
    if is_file_object(target):
        return str(getattr(target, "name", None) or f"<{type(target).__name__}>")
    return os.fspath(target)


def _read_all(target):
    """The whole content of a path, or of a file object from its current position."""
    if is_file_object(target):
        return bytes(target.read())
    _remove_stale_temps(target)
    with open(target, "rb") as f:
        return f.read()


def _temp_pattern(name):
    """Temp files of a save of ``name``: ``.{name}.{12 hex}.tmp`` in the same directory."""
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")


def _remove_stale_temps(path):
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


def _atomic_write(path, chunks):
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
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    _remove_stale_temps(path)
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


def _validated_arrays(state):
    _check_scalars(state, ValueError)
    a = _arrays_from_state(state, ValueError)
    _check_graph(a, M=state["M"], entry_point=state["entry_point"],
                 max_level=state["max_level"], err=ValueError)
    return a


def write_gpuhnsw(path, state, *, ef):
    """Save ``state`` in gpuhnsw's own checksummed format (``MAGIC``, version ``FORMAT_VERSION``).

    Parameters
    ----------
    path : str or os.PathLike
        Destination; replaced atomically.
    state : dict
        The state dict (see the module docstring); byte fields may be any contiguous buffer.
    ef : int or None
        The query-time ``ef`` to store (hnswlib's format does not keep it); None stores nothing.

    Raises
    ------
    ValueError
        If ``state`` is inconsistent (nothing is written).
    OSError
        If the file cannot be written (no temp file is left behind).
    """
    a = _validated_arrays(state)
    if ef is not None and (isinstance(ef, bool) or not isinstance(ef, (int, np.integer))
                           or not 0 <= ef < 2**63):
        raise ValueError(f"ef must be None or an int in [0, 2**63), got {ef!r}")
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, SPACES.index(state["space"]), bool(state["allow_replace_deleted"]),
        state["dim"], state["M"], state["ef_construction"], state["random_seed"],
        state["max_elements"], state["count"], state["entry_point"], state["max_level"],
        state["insert_seq"], -1 if ef is None else ef)
    chunks = [header, _CRC.pack(zlib.crc32(header))]
    pos = len(header) + _CRC.size
    # the mappable sections hold the engine's rows (see the module docstring)
    a["links0"], _ = _normalised(a, state["M"])
    dim = state["dim"]
    if dim % 4:
        padded = np.zeros((state["count"], _dim_pad(dim)), dtype=np.float32)
        padded[:, :dim] = a["vectors"]
        a["vectors"] = padded
    for key, tag, _ in _SECTIONS:
        data = memoryview(a[key].reshape(-1).view(np.uint8))
        pos += _SECTION.size
        pad = -pos % MAP_ALIGN if key in _MAPPED else 0
        chunks += [_SECTION.pack(tag, data.nbytes, zlib.crc32(data), pad), bytes(pad), data]
        pos += pad + data.nbytes
    _atomic_write(path, chunks)


def write_hnswlib(path, state):
    """Save ``state`` in hnswlib 0.8.0's ``save_index`` format, loadable by ``hnswlib.Index.load_index``.

    Unused link entries are written as 0 (hnswlib zero-fills new lists and reads only ``count``
    entries). ``random_seed``, ``insert_seq``, ``allow_replace_deleted`` and the space are not part
    of the format and are lost.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; replaced atomically.
    state : dict
        The state dict (see the module docstring).

    Raises
    ------
    ValueError
        If ``state`` is inconsistent (nothing is written).
    OSError
        If the file cannot be written (no temp file is left behind).
    """
    a = _validated_arrays(state)
    n, dim, M = state["count"], state["dim"], state["M"]
    M0 = 2 * M
    rec = np.zeros(n, dtype=_hnswlib_record_dtype(M0, dim))
    rec["count"] = a["degree0"]
    rec["flags"] = a["deleted"]
    rec["links"] = a["links0"]
    rec["links"][np.arange(M0)[None, :] >= a["degree0"][:, None]] = 0
    rec["vector"] = a["vectors"]
    rec["label"] = a["labels"]

    # Per slot: uint32 linkListSize, then its upper blocks. Build the whole tail as one uint32
    # array: slot i's size word sits after the size words and blocks of slots 0..i-1.
    words = a["levels"].astype(np.int64) * (1 + M)  # uint32 words of each slot's blocks
    size_pos = np.arange(n) + np.cumsum(words) - words
    tail = np.zeros(n + a["upper"].size, dtype="<u4")
    tail[size_pos] = words * 4
    is_block = np.ones(tail.size, dtype=bool)
    is_block[size_pos] = False
    blocks = a["upper"].reshape(-1, 1 + M).copy()
    blocks[:, 1:][np.arange(M)[None, :] >= blocks[:, :1]] = 0
    tail[is_block] = blocks.reshape(-1)

    empty = n == 0
    header = _HNSW_HEADER.pack(
        0, state["max_elements"], n, rec.dtype.itemsize, rec.dtype.fields["label"][1],
        rec.dtype.fields["vector"][1], -1 if empty else state["max_level"],
        NO_LINK if empty else state["entry_point"], M, M0, M,
        1.0 / math.log(M) if M > 1 else math.inf, state["ef_construction"])
    _atomic_write(path, [header, memoryview(rec.view(np.uint8)), memoryview(tail.view(np.uint8))])


def _hnswlib_record_dtype(M0, dim):
    """One level-0 record of hnswlib: ``size_data_per_element = 4 + 4*M0 + 4*dim + 8`` bytes."""
    return np.dtype([("count", "<u2"), ("flags", "u1"), ("unused", "u1"), ("links", "<u4", (M0,)),
                     ("vector", "<f4", (dim,)), ("label", "<u8")])


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
    buf = _read_all(path)
    try:
        if not buf:
            raise IndexFileError("index file is empty")
        if buf[:len(MAGIC)] == MAGIC:
            state, ef = _read_gpuhnsw(buf, space, dim)
            return state, ef, "gpuhnsw"
        return _read_hnswlib(buf, space, dim), None, "hnswlib"
    except IndexFileError as exc:
        raise IndexFileError(f"{source_name(path)}: {exc}") from None


@contextlib.contextmanager
def map_index(path, *, space, dim, verify=False):
    """Open an index file in our format (version 2) for a mapped load.

    Yields ``(state, ef, mapping)``: the state dict with ``vectors`` and ``links0`` None, the stored
    ``ef`` (or None), and the keyword arguments of ``_core.Core.from_state`` that map those two
    sections from the open file (``fd``, ``vectors_offset``, ``links0_offset``); the file is closed
    when the block ends (a mapping keeps its own reference to the file).

    Verified here: the header, every section's bounds, the CRC32 of every section but ``vectors``
    and the invariants ``read_index`` checks; the engine range-checks ``links0`` as it adopts the
    mapping (its integrity check).  ``vectors`` are not read (that is what makes the load fast), or
    checksummed and checked for NaN/inf and zero padding with ``verify=True`` (one read of them).

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
    if is_file_object(path):
        raise ValueError("mmap=True needs a path: a file object cannot be mapped")
    _remove_stale_temps(path)
    with open(path, "rb") as f:
        try:
            state, ef, mapping = _map_gpuhnsw(f.fileno(), space, dim, verify)
        except IndexFileError as exc:
            raise IndexFileError(f"{source_name(path)}: {exc}") from None
        yield state, ef, mapping


def _parse_header(head, space, dim):
    """(state scalars, ef, version) from the first bytes of a file in our format."""
    hsize = _HEADER.size + _CRC.size
    if len(head) < hsize:
        raise IndexFileError(f"gpuhnsw file truncated in the header ({len(head)} bytes)")
    fields = _HEADER.unpack_from(head)
    (_, version, space_code, allow_replace, fdim, M, ef_c, seed, max_elements, n, ep, max_level,
     insert_seq, ef) = fields
    if version not in (1, FORMAT_VERSION):
        raise IndexFileError(f"unsupported gpuhnsw file version {version} (this build reads 1 and "
                             f"{FORMAT_VERSION})")
    if _CRC.unpack_from(head, _HEADER.size)[0] != zlib.crc32(memoryview(head)[:_HEADER.size]):
        raise IndexFileError("gpuhnsw header checksum mismatch (file corrupted)")
    if space_code >= len(SPACES) or allow_replace > 1 or ef < -1:
        raise IndexFileError("gpuhnsw header has invalid space code, flag or ef")
    if SPACES[space_code] != space:
        raise IndexFileError(f"index file space is {SPACES[space_code]!r}, the index's is {space!r}")
    if fdim != dim:
        raise IndexFileError(f"index file dim is {fdim}, the index's is {dim}")
    state = dict(space=space, dim=dim, M=M, ef_construction=ef_c, random_seed=seed,
                 allow_replace_deleted=bool(allow_replace), max_elements=max_elements, count=n,
                 entry_point=ep, max_level=max_level, insert_seq=insert_seq)
    _check_scalars(state, IndexFileError)
    return state, None if ef == -1 else ef, version


def _section_layout(read, size, version):
    """{state key: (offset, length, crc)} of the sections of a file of ``size`` bytes in our format,
    from the section headers alone (``read(pos, n) -> bytes``): each in order, inside the file,
    nothing after the last."""
    fmt = _SECTION if version >= 2 else _SECTION_V1
    pos = _HEADER.size + _CRC.size
    out = {}
    for key, tag, _ in _SECTIONS:
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


def _unpadded(vectors, n, dim):
    """Version-2 vectors (bytes-like float32 [n, dim_pad]) as the state's float32 [n, dim] bytes."""
    if len(vectors) != n * 4 * _dim_pad(dim):
        raise IndexFileError(f"section VECS: {len(vectors)} bytes, expected {n * 4 * _dim_pad(dim)}")
    if dim % 4 == 0:
        return vectors
    return np.frombuffer(vectors, dtype=np.float32).reshape(n, _dim_pad(dim))[:, :dim].tobytes()


def _finished(state, M):
    """``state`` whose sections were read (None: mapped) after the graph checks, with unused link
    entries normalised, byte fields as ``bytes``."""
    a = _arrays_from_state(state, IndexFileError)
    _check_graph(a, M=M, entry_point=state["entry_point"], max_level=state["max_level"], err=IndexFileError)
    links0, upper = _normalised(a, M)
    state.update({key: bytes(state[key]) for key, _, _ in _SECTIONS if state[key] is not None})
    state["upper"] = upper.tobytes()
    if links0 is not None:
        state["links0"] = links0.tobytes()
    return state


def _read_gpuhnsw(buf, space, dim):
    state, ef, version = _parse_header(buf[:_HEADER.size + _CRC.size], space, dim)
    layout = _section_layout(lambda pos, n: buf[pos:pos + n], len(buf), version)
    for key, tag, _ in _SECTIONS:
        state[key] = _checked_section(buf, *layout[key], f"section {tag.decode()}")
    if version >= 2:
        state["vectors"] = _unpadded(state["vectors"], state["count"], dim)
    return _finished(state, state["M"]), ef


def _map_gpuhnsw(fd, space, dim, verify):
    """(state, ef, Core.from_state mapping keywords) of the open file ``fd`` (see ``map_index``)."""
    size = os.fstat(fd).st_size

    def read(pos, n):
        return os.pread(fd, n, pos)

    head = read(0, _HEADER.size + _CRC.size)
    if head[:len(MAGIC)] != MAGIC:
        raise IndexFileError("not in gpuhnsw's own format (an hnswlib file?): it cannot be mapped; load it "
                             "without mmap, and save it to map it next time")
    state, ef, version = _parse_header(head, space, dim)
    if version < 2:
        raise IndexFileError(f"a version {version} file cannot be mapped; load it without mmap, and save it "
                             "to map it next time")
    layout = _section_layout(read, size, version)
    n = state["count"]
    for key, tag, _ in _SECTIONS:
        off, length, crc = layout[key]
        name = f"section {tag.decode()}"
        if key not in _MAPPED:
            state[key] = _checked_section(read(off, length), 0, length, crc, name)
            continue
        row = 8 * state["M"] if key == "links0" else 4 * _dim_pad(dim)
        if length != n * row:
            raise IndexFileError(f"{name}: {length} bytes, expected {n * row} for {n} rows")
        if key == "links0" or verify:
            _check_mapped(fd, off, length, crc, name, dim if key == "vectors" else None)
        state[key] = None
    mapping = dict(fd=fd, vectors_offset=layout["vectors"][0], links0_offset=layout["links0"][0])
    return _finished(state, state["M"]), ef, mapping


def _check_mapped(fd, off, length, crc, name, dim):
    """CRC32 of ``length`` bytes of ``fd`` at ``off``, read through a mapping (the page cache, no
    private copy); for vectors (``dim`` given) also finite values and zero padding."""
    if not length:
        ok = zlib.crc32(b"") == crc
    else:
        start = off - off % mmap.ALLOCATIONGRANULARITY   # mappings start at page boundaries
        with mmap.mmap(fd, off - start + length, offset=start, access=mmap.ACCESS_READ) as mm:
            data = memoryview(mm)[off - start:]
            ok = zlib.crc32(data) == crc
            bad = False
            if ok and dim is not None:
                rows = np.frombuffer(data, dtype=np.float32).reshape(-1, _dim_pad(dim))
                bad = not np.isfinite(rows).all() or bool(rows[:, dim:].any())
                del rows
            data.release()  # before the mapping closes
            if bad:
                raise IndexFileError(f"{name}: NaN, inf or non-zero padding")
    if not ok:
        raise IndexFileError(f"{name} checksum mismatch (file corrupted)")


def _checked_section(buf, pos, length, crc, name):
    """The ``length`` bytes of ``buf`` at ``pos`` as a memoryview, after checking that they lie
    inside the file and match ``crc`` (CRC32); else IndexFileError naming ``name``."""
    if length > len(buf) - pos:  # before slicing: a huge length must not be trusted
        raise IndexFileError(f"{name} ({length} bytes) runs past the end of the file")
    data = memoryview(buf)[pos:pos + length]
    if zlib.crc32(data) != crc:
        raise IndexFileError(f"{name} checksum mismatch (file corrupted)")
    return data


def _read_hnswlib(buf, space, dim):
    size = len(buf)
    if size < _HNSW_HEADER.size:
        raise IndexFileError(f"file too short for an hnswlib index ({size} bytes) and not a "
                             f"gpuhnsw file")
    (offset_level0, max_elements, n, size_per_element, label_offset, offset_data, max_level, ep,
     maxM, maxM0, M, mult, ef_c) = _HNSW_HEADER.unpack_from(buf)
    if offset_level0 != 0:
        raise IndexFileError(f"not an hnswlib index: offsetLevel0={offset_level0}, expected 0")
    if not 2 <= M <= MAX_M or maxM != M or maxM0 != 2 * M:
        raise IndexFileError(f"unsupported hnswlib index: M={M}, maxM={maxM}, maxM0={maxM0} "
                             f"(need 2 <= M <= {MAX_M}, maxM = M, maxM0 = 2M)")
    if M > 1 and not math.isclose(mult, 1.0 / math.log(M), rel_tol=1e-9):
        raise IndexFileError(f"unsupported hnswlib index: mult={mult} is not 1/ln(M)")
    if offset_data != 4 + 4 * maxM0:
        raise IndexFileError(f"hnswlib header: offsetData={offset_data}, expected {4 + 4 * maxM0}")
    if label_offset < offset_data or (label_offset - offset_data) % 4:
        raise IndexFileError(f"hnswlib header: bad label_offset={label_offset}")
    fdim = (label_offset - offset_data) // 4
    if fdim != dim:
        raise IndexFileError(f"index file dim is {fdim}, the index's is {dim}")
    if size_per_element != label_offset + 8:
        raise IndexFileError(f"hnswlib header: size_data_per_element={size_per_element}, "
                             f"expected {label_offset + 8}")
    if not n <= max_elements <= MAX_CAPACITY:
        raise IndexFileError(f"hnswlib header: count={n}, max_elements={max_elements} (need count <= "
                             f"max_elements <= {MAX_CAPACITY})")
    # Each element takes its level-0 record and at least a 4-byte linkListSize.
    if n * (size_per_element + 4) > size - _HNSW_HEADER.size:
        raise IndexFileError(f"hnswlib file truncated: {n} elements need at least "
                             f"{_HNSW_HEADER.size + n * (size_per_element + 4)} bytes, file has {size}")

    rec = np.frombuffer(buf, dtype=_hnswlib_record_dtype(maxM0, dim), count=n,
                        offset=_HNSW_HEADER.size)
    degree0 = rec["count"].astype(np.uint32)
    deleted = rec["flags"] & 1  # hnswlib reads bit 0 only

    levels, upper = _read_hnswlib_link_lists(buf, _HNSW_HEADER.size + n * size_per_element, n, M)
    entry_point = -1 if n == 0 and ep == NO_LINK else ep
    state = dict(space=space, dim=dim, M=M, ef_construction=ef_c, random_seed=_HNSW_RANDOM_SEED,
                 allow_replace_deleted=False, max_elements=max_elements, count=n,
                 entry_point=entry_point, max_level=max_level, insert_seq=n)
    _check_scalars(state, IndexFileError)
    a = dict(links0=rec["links"], degree0=degree0, labels=rec["label"], levels=levels,
             upper=upper, deleted=deleted)
    _check_graph(a, M=M, entry_point=entry_point, max_level=max_level, err=IndexFileError)
    links0, upper = _normalised(a, M)
    # tobytes() of a strided field view copies once, straight into C order.
    state.update(vectors=rec["vector"].tobytes(), links0=links0.tobytes(), degree0=degree0.tobytes(),
                 labels=rec["label"].tobytes(), levels=levels.tobytes(),
                 upper=upper.tobytes(), deleted=deleted.astype(np.uint8).tobytes())
    return state


def _read_hnswlib_link_lists(buf, start, n, M):
    """Walk hnswlib's per-element ``[uint32 linkListSize][blocks]`` records from byte ``start``.

    Returns ``levels`` uint8 [n] and ``upper`` uint32 [sum(levels) * (1 + M)] (count words masked to
    their low 16 bits, as hnswlib reads them). The sizes must be walked in order, but most are 0
    (level-0-only elements), so the loop jumps from one non-zero size word to the next with
    ``searchsorted`` and runs once per element that has upper levels.
    """
    tail_bytes = len(buf) - start
    if tail_bytes % 4:
        raise IndexFileError("hnswlib link lists: trailing bytes are not a whole number of uint32")
    tail = np.frombuffer(buf, dtype="<u4", offset=start)
    nonzero = np.flatnonzero(tail)
    block = 1 + M  # uint32 words per level block: [count][M ids]
    levels = np.zeros(n, dtype=np.uint8)
    spans = []  # (first word, words) of each element's blocks
    pos = 0  # word index into tail
    i = 0  # element whose size word is at tail[pos]
    while i < n:
        k = np.searchsorted(nonzero, pos)
        next_nz = int(nonzero[k]) if k < nonzero.size else tail.size
        i += next_nz - pos  # elements pos..next_nz-1 have linkListSize 0
        if i >= n:
            pos = next_nz - (i - n)
            break
        if next_nz >= tail.size:
            raise IndexFileError(f"hnswlib link lists truncated at element {i} of {n}")
        words, rem = divmod(int(tail[next_nz]), 4)
        level, rem2 = divmod(words, block)
        if rem or rem2:
            raise IndexFileError(f"hnswlib element {i}: linkListSize {int(tail[next_nz])} is not a "
                                 f"multiple of the level block ({4 * block} bytes)")
        if level > MAX_LEVEL:
            raise IndexFileError(f"hnswlib element {i}: level {level} above {MAX_LEVEL}")
        if next_nz + 1 + words > tail.size:
            raise IndexFileError(f"hnswlib link lists truncated at element {i} of {n}")
        levels[i] = level
        spans.append((next_nz + 1, words))
        pos = next_nz + 1 + words
        i += 1
    if pos != tail.size:
        raise IndexFileError(f"{4 * (tail.size - pos)} unexpected bytes after the hnswlib link lists")
    if spans:
        upper = np.concatenate([tail[s:s + w] for s, w in spans])
    else:
        upper = np.zeros(0, dtype=np.uint32)
    upper = upper.astype(np.uint32)  # own, native copy
    upper[::block] &= 0xFFFF
    return levels, upper


# ---------------------------------------------------------------------------------------------
# BFIndex files
# ---------------------------------------------------------------------------------------------

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
        chunks = [head, _CRC.pack(zlib.crc32(head))]
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
    _atomic_write(path, chunks)


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
    buf = _read_all(path)
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
    if len(buf) < hs + _CRC.size:
        raise IndexFileError("truncated header")
    _, version, code, fdim, cap, n, next_auto = _BF_HEADER.unpack_from(buf, 0)
    if version != BF_FORMAT_VERSION:
        raise IndexFileError(f"unsupported BFIndex file version {version} (this build reads "
                             f"{BF_FORMAT_VERSION})")
    if zlib.crc32(memoryview(buf)[:hs]) != _CRC.unpack_from(buf, hs)[0]:
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
    pos = hs + _CRC.size
    out = {}
    for name, dtype, width in (("vectors", "<f4", dim), ("labels", "<u8", 1)):
        if len(buf) < pos + _BF_SECTION.size:
            raise IndexFileError(f"truncated before the {name} section")
        nbytes, crc = _BF_SECTION.unpack_from(buf, pos)
        pos += _BF_SECTION.size
        want = n * width * np.dtype(dtype).itemsize
        if nbytes != want:
            raise IndexFileError(f"{name} section holds {nbytes} bytes, expected {want}")
        data = _checked_section(buf, pos, nbytes, crc, f"{name} section")
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
