"""hnswlib 0.8.0's ``save_index`` format, read (auto-detected by ``native.read_index``) and written
on request, over the state dict (``state.py``).  The layout: docs/architecture.md and hnswlib's
``hnswalg.h`` (a 96-byte header, ``count`` level-0 records, then each element's upper link lists).

hnswlib files store neither the space nor the seed: the caller gives the space, and an index read
from one gets hnswlib's default seed.
"""
import math
import struct

import numpy as np

from .._core import MAX_CAPACITY, MAX_LEVEL, MAX_M
from .._errors import IndexFileError
from .._surface import DEFAULT_SEED
from .files import atomic_write
from .state import NO_LINK, check_graph, check_scalars, normalised, validated_arrays

__all__ = ["write", "read", "peek", "pack_header", "HEADER_BYTES"]

# offsetLevel0, max_elements, cur_element_count, size_data_per_element, label_offset, offsetData,
# maxlevel, enterpoint_node, maxM, maxM0, M, mult, ef_construction
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
HEADER_BYTES = _HEADER.size


def pack_header(*fields):
    """The header of an hnswlib file from its 13 fields, in file order (struct.error where one is out
    of range)."""
    return _HEADER.pack(*fields)


def write(path, state):
    """Save ``state`` in hnswlib 0.8.0's ``save_index`` format, loadable by ``hnswlib.Index.load_index``.

    Unused link entries are written as 0 (hnswlib zero-fills new lists and reads only ``count``
    entries). ``random_seed``, ``insert_seq``, ``allow_replace_deleted`` and the space are not part
    of the format and are lost.

    ``path``: a path (replaced atomically) or a binary file object; ``state``: the state dict
    (``state.py``).  ValueError if it is inconsistent and OSError if the file cannot be written, as
    ``native.write_gpuhnsw``: nothing is written, no temp file is left behind.
    """
    a = validated_arrays(state)
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
    header = _HEADER.pack(
        0, state["max_elements"], n, rec.dtype.itemsize, rec.dtype.fields["label"][1],
        rec.dtype.fields["vector"][1], -1 if empty else state["max_level"],
        NO_LINK if empty else state["entry_point"], M, M0, M,
        1.0 / math.log(M) if M > 1 else math.inf, state["ef_construction"])
    atomic_write(path, [header, memoryview(rec.view(np.uint8)), memoryview(tail.view(np.uint8))])


def _hnswlib_record_dtype(M0, dim):
    """One level-0 record of hnswlib: ``size_data_per_element = 4 + 4*M0 + 4*dim + 8`` bytes."""
    return np.dtype([("count", "<u2"), ("flags", "u1"), ("unused", "u1"), ("links", "<u4", (M0,)),
                     ("vector", "<f4", (dim,)), ("label", "<u8")])


def read(buf, space, dim):
    size = len(buf)
    if size < _HEADER.size:
        raise IndexFileError(f"file too short for an hnswlib index ({size} bytes) and not a "
                             f"gpuhnsw file")
    (offset_level0, max_elements, n, size_per_element, label_offset, offset_data, max_level, ep,
     maxM, maxM0, M, mult, ef_c) = _HEADER.unpack_from(buf)
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
    if n * (size_per_element + 4) > size - _HEADER.size:
        raise IndexFileError(f"hnswlib file truncated: {n} elements need at least "
                             f"{_HEADER.size + n * (size_per_element + 4)} bytes, file has {size}")

    rec = np.frombuffer(buf, dtype=_hnswlib_record_dtype(maxM0, dim), count=n,
                        offset=_HEADER.size)
    degree0 = rec["count"].astype(np.uint32)
    deleted = rec["flags"] & 1  # hnswlib reads bit 0 only

    levels, upper = _read_hnswlib_link_lists(buf, _HEADER.size + n * size_per_element, n, M)
    entry_point = -1 if n == 0 and ep == NO_LINK else ep
    state = dict(space=space, dim=dim, M=M, ef_construction=ef_c, random_seed=DEFAULT_SEED,
                 allow_replace_deleted=False, max_elements=max_elements, count=n,
                 entry_point=entry_point, max_level=max_level, insert_seq=n)
    check_scalars(state, IndexFileError)
    a = dict(links0=rec["links"], degree0=degree0, labels=rec["label"], levels=levels,
             upper=upper, deleted=deleted)
    check_graph(a, M=M, entry_point=entry_point, max_level=max_level, err=IndexFileError)
    links0, upper = normalised(a, M)
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


def peek(head):
    """The dim of an hnswlib index file from its first ``HEADER_BYTES`` bytes ``head``, or None
    where they are not such a header (only the fields the dim comes from are looked at)."""
    if len(head) < _HEADER.size:
        return None
    offset0, _, _, _, label_offset, offset_data, *_ = _HEADER.unpack_from(head)
    if offset0 == 0 and label_offset > offset_data and (label_offset - offset_data) % 4 == 0:
        return int((label_offset - offset_data) // 4)
    return None
