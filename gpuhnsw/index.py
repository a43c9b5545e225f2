"""``gpuhnsw.Index``: hnswlib 0.8.0's Python surface over the C core, plus keyword-only extras.

Existing hnswlib code runs unchanged after ``import gpuhnsw as hnswlib``.  Where hnswlib crashes or
silently misbehaves (query of an uninitialised index, wrong query width, NaN input, ...), this class
raises a clear exception and leaves the index exactly as it was.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from typing import Any, BinaryIO, Callable, Union

import numpy as np
from numpy.typing import ArrayLike

from . import _core, _search_graph
from ._errors import DeviceError, IndexFileError, IndexFileNotFoundError
from ._io import hnswlib_format, native
from ._io.files import is_file_object, source_name
from ._io.pickles import check_state
from ._progress import ADD_ITEMS_MIN_ROWS, Progress, wanted as progress_wanted
from ._rows import normalize_rows
from ._surface import DEFAULT_SEED, IndexSurface
from ._validate import (as_int, as_label, as_labels, as_vectors, check_dim, check_radius, check_space, check_storage,
                        cpu_count, flat_labels, memory_limit, num_threads as num_threads_rule, on_host,
                        resolve_device, threads_for)
from .search import planner
from .search.filters import filter_rows, popcount
from .search.gpu import STORAGES as GPU_STORAGES, DeviceSearch
from .search.params import SearchParams

_log = logging.getLogger("gpuhnsw")

# Annotation aliases: a label filter (see knn_query), a file argument, a NumPy or CuPy result
Filter = Union[Callable[[int], bool], ArrayLike, set, list]
IndexFile = Union[str, os.PathLike, BinaryIO]
Array = Any

GPU_BUILD_MIN_ROWS = 20_000   # build="auto" uses the GPU for inserts at least this large
GPU_BUILD_SEED = 10_000       # elements inserted on the CPU before batches take GPU candidates
GPU_BUILD_BATCH = 65_536      # largest batch (batches are also at most a quarter of the graph)


def _check_memory(capacity, dim, M, error, storage="float32", rerank=False):
    """Refuse a capacity whose arrays cannot fit in the memory this process may use (the machine's,
    or a container's cgroup limit), before allocating: a corrupted file's capacity field must give a
    clear error, not an out-of-memory kill."""
    exact = ((dim + 3) // 4) * 16 if rerank else 0
    per_slot = _core.row_bytes(dim, storage) + exact + 8 * M + 48  # rows, links0, degree, label, level, map
    need, have = capacity * per_slot, memory_limit()
    if have is not None and need > have:
        raise error(f"an index of {capacity} elements needs about {need / 2**30:.1f} GiB, "
                    f"more than the {have / 2**30:.1f} GiB of memory this process may use")


class Index(IndexSurface):
    """An HNSW index (hnswlib-compatible).

    ``Index(space, dim)``, ``Index(state_dict)`` (from ``__getstate__``, ours or hnswlib's) or
    ``Index(other)`` (a deep copy); as in hnswlib also ``Index(params=state_dict)`` and
    ``Index(index=other)``.  ``space`` is ``'l2'`` (squared L2), ``'ip'`` (1 - dot) or ``'cosine'``
    (ip on normalised vectors); ``dim`` the width of the vectors.

    Keyword-only: ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``) chooses where queries
    run; ``"auto"`` uses a GPU when CuPy sees one and the CPU otherwise.  Inserts are linked by the
    C engine (large inserts into a GPU index take their candidates from the GPU, see
    :meth:`add_items`) and reach the GPU as deltas at the next :meth:`sync` (done lazily before each
    GPU query).

    ``storage`` (keyword-only) is how the engine stores the vectors, on the CPU and in the GPU mirror:

    - ``"float32"`` (default): as given (normalised for cosine);
    - ``"float16"``: IEEE half precision, half the bytes (values beyond +-65504 are refused);
    - ``"int8"``: per-dimension scalar quantisation, a quarter of the bytes: dimension ``i`` maps
      its range ``[low_i, high_i]`` onto 256 codes.  The ranges come from the first
      :meth:`add_items` call (its rows' per-dimension minimum and maximum; cosine: of the
      normalised rows), or from :meth:`train` before it; a dimension whose training values are
      integers spanning at most 256 values (pixels, SIFT) gets a step of 1 and is stored exactly.
      Later values outside the ranges are clipped to them, counted (:meth:`storage_info`) and
      reported by a ``UserWarning``.

    Distances are computed on the stored form (int8: an exact integer dot product against the
    query's weights, see ``gpuhnsw/csrc/storage.c``), in the search and in the insertions.  The GPU
    mirror holds float16 rows for both compressed storages (int8 rows are decoded on upload).

    ``rerank`` (keyword-only, default False): also keep the float32 rows (RAM, or mapped from the
    file by ``load_index(mmap=True)``) and re-score the final ``max(ef, k)`` candidates of each CPU
    query with them, so returned distances are exact; :meth:`get_items` then returns the exact
    rows.  (GPU queries return the mirror's float16 distances.)

    ``storage=None`` / ``rerank=None`` (the defaults for copies) mean: float32 without re-rank for a
    new index, and what the source holds for ``Index(state)``, ``Index(other)`` and
    :meth:`load_index`.  Given explicitly there, float32 rows (an hnswlib file, a float32 index) are
    encoded into the requested storage; compressed rows load only as they are.

    ``gpu_storage`` (keyword-only, a GPU index only): the mirror's row type, ``"float32"``,
    ``"float16"`` or ``"bfloat16"`` (16 bits halve device memory and bandwidth; distances still
    accumulate in float32; bfloat16 rows are searched by the fixed-degree kernel only, see
    ``GHNSW_SEARCH_KERNEL`` in docs/architecture.md).  None (default): float32 rows for a float32
    index, float16 rows for the compressed ones.  It changes only the device copy, never what the
    engine stores or saves.

    ``search_graph`` (keyword-only): the graph the GPU search follows on level 0 (None: the
    source's for a copy, else ``"hnsw"``).  ``"hnsw"``: HNSW level 0 as built.  ``"optimized"``: a
    fixed-degree graph derived from it (each element's level-0 list, then the elements whose lists
    name it, up to 64 entries; ``gpuhnsw/_search_graph.py``), built on the GPU, kept in step with
    every change at each :meth:`sync` (rows changed since the last one are updated, the whole graph
    rebuilt when half of them changed), read by the fixed-degree kernel, and saved with the index
    (``save_index``'s own format).  It costs 256 bytes per element on the GPU and as much on the
    host (the copy its updates work on, in :meth:`memory_usage`).  CPU queries always follow HNSW
    level 0 (the graph did not clearly speed them up: benchmarks/results/graph_replay.md); a CPU
    index builds the graph only to save it.
    """

    def __init__(self, space: str | dict | Index | None = None, dim: int | None = None, *, device: str = "auto",
                 storage: str | None = None, rerank: bool | None = None, gpu_storage: str | None = None,
                 search_graph: str | None = None, params: dict | None = None, index: Index | None = None):
        self._core = None
        self._ef = 10
        self._num_threads = cpu_count()
        self._cur_l = 0
        self._cur_l_lock = threading.Lock()
        self._grow_lock = threading.Lock()
        self._auto_resize = False
        self._mapped_file = None   # (st_dev, st_ino, st_size) of the file a mapped load maps
        self._lost = None          # why the index is gone (its mapped file was truncated), or None
        self._device, self._device_ordinal = resolve_device(device)
        # as requested (None: see the class docstring); the core's own once there is one
        self._storage_arg = None if storage is None else check_storage(storage)
        if rerank is not None and not isinstance(rerank, (bool, np.bool_)):
            raise TypeError(f"rerank must be a bool, got {type(rerank).__name__}")
        self._rerank_arg = None if rerank is None else bool(rerank)
        if gpu_storage is not None and gpu_storage not in GPU_STORAGES:
            raise ValueError(f"gpu_storage must be one of {', '.join(map(repr, GPU_STORAGES))}, got {gpu_storage!r}")
        self._gpu_storage_arg = gpu_storage
        if search_graph is not None and search_graph not in _search_graph.MODES:
            raise ValueError(f"search_graph must be one of {', '.join(map(repr, _search_graph.MODES))}, "
                             f"got {search_graph!r}")
        # hnswlib's three forms: (space, dim), a state dict, another index (first argument or keyword)
        sources = [x for x in (params, index, space if isinstance(space, (dict, Index)) else None) if x is not None]
        state = None
        if sources:
            if len(sources) > 1 or dim is not None or (space is not None and sources[0] is not space):
                raise TypeError("Index() takes space and dim, or one state dict (params=), or one Index (index=)")
            src = sources[0]
            state = check_state(src.__getstate__()[0] if isinstance(src, Index) else src)
        # as requested, else the source's, else "hnsw"
        self._search_graph_mode = search_graph or (state or {}).get("search_graph", "hnsw")
        self._graph = None   # the SearchGraph of the core, where the mode is "optimized"
        self._gpu = DeviceSearch(self._device_ordinal, self._mirror_storage(self.storage), self._search_graph_mode) \
            if self._device == "cuda" else None
        if state is not None:
            self._space, self._dim = check_space(state["space"]), check_dim(state["dim"])
            self._restore(state)
            return
        if space is None or dim is None:
            raise TypeError("Index() needs space and dim (or a state dict, or an Index to copy)")
        self._space = check_space(space)
        self._dim = check_dim(dim)

    # ---------------------------------------------------------------- lifecycle
    def init_index(self, max_elements: int, M: int = 16, ef_construction: int = 200, random_seed: int = DEFAULT_SEED,
                   allow_replace_deleted: bool = False, *, auto_resize: bool = False) -> None:
        """Allocate an empty index of capacity ``max_elements``.

        ``M`` links per node on upper levels (``2*M`` on level 0, at least 2); ``ef_construction``
        is raised to at least ``M`` (as hnswlib); levels come from ``(random_seed, row number)``.
        ``auto_resize`` (keyword-only): :meth:`add_items` grows the capacity (at least doubling it)
        instead of raising when a batch's new labels do not fit (updates take no slot).
        """
        if self._core is not None:
            raise RuntimeError("The index is already initiated.")
        max_elements = as_int(max_elements, "max_elements", minimum=0)
        M = as_int(M, "M", minimum=0)
        ef_construction = as_int(ef_construction, "ef_construction", minimum=0)
        random_seed = as_int(random_seed, "random_seed", minimum=0)
        if M < 2:
            raise ValueError(f"M must be at least 2, got {M}")
        if M > _core.MAX_M:
            raise ValueError(f"M must be at most {_core.MAX_M}, got {M}")
        storage, rerank = self._storage_arg or "float32", bool(self._rerank_arg)
        _check_memory(max_elements, self._dim, M, MemoryError, storage, rerank)
        self._set_core(_core.Core(self._space, self._dim, max_elements, M, max(ef_construction, M),
                                  random_seed & (2**64 - 1), bool(allow_replace_deleted), storage, rerank))
        self._cur_l = 0
        self._auto_resize = bool(auto_resize)

    def _need_init(self):
        if self._core is None:
            raise RuntimeError(self._lost or "Index is not initialized: call init_index() or load_index() first")
        return self._core

    def _set_core(self, core, graph=None):
        """Adopt ``core`` (and ``graph``, its saved search graph, where the mode keeps one); the GPU
        mirror follows its storage."""
        self._core = core
        if self._search_graph_mode == "optimized":
            self._graph = graph or _search_graph.SearchGraph()
        if self._gpu is not None:
            self._gpu.storage = self._mirror_storage(core.storage)
            self._gpu.graph = self._graph

    def train(self, data: ArrayLike | None = None, *, low: ArrayLike | None = None,
              high: ArrayLike | None = None) -> None:
        """Set the int8 ranges before the first row is stored (``storage="int8"`` only).

        ``data`` (float32-castable ``[n, dim]``): the per-dimension minimum and maximum of these
        rows (cosine: of the rows normalised), so a representative sample can set the ranges instead
        of the first :meth:`add_items` batch.  Or, keyword-only, ``low`` and ``high``
        (``[dim]`` or scalars, ``low <= high``, finite): the ranges themselves (cosine: of the
        normalised rows).  Raises ``RuntimeError`` once rows are stored.
        """
        core = self._need_init()
        if core.storage != "int8":
            raise ValueError(f"train() sets int8 ranges; this index stores {core.storage}")
        if (data is None) == (low is None and high is None) or (low is None) != (high is None):
            raise ValueError("train() takes data, or low and high")
        integral = None
        if data is not None:
            rows = as_vectors(data, self._dim)
            if not rows.shape[0]:
                raise ValueError("train() needs at least one row")
            if self._space == "cosine":
                rows = normalize_rows(rows)
            low, high = rows.min(axis=0), rows.max(axis=0)
            integral = ((rows == np.rint(rows)) & (np.abs(rows) < 2**22)).all(axis=0).astype(np.uint8)
        bounds = []
        for name, value in (("low", low), ("high", high)):
            arr = np.broadcast_to(np.asarray(on_host(value), dtype=np.float64), (self._dim,))
            if not np.isfinite(arr).all() or np.abs(arr).max(initial=0) > np.finfo(np.float32).max:
                raise ValueError(f"{name} must be finite float32 values")
            bounds.append(np.ascontiguousarray(arr, dtype=np.float32))
        core.train(*bounds, *(() if integral is None else (integral,)))

    def storage_info(self) -> dict:
        """How the vectors are stored: ``storage``, ``rerank``, ``bytes_per_row`` (the stored
        row), and for int8 ``trained`` and, once trained, the ranges ``low`` / ``high`` and the
        quantiser ``offset`` / ``scale`` (float32 ``[dim]``: a value ``x`` is stored as the code
        ``round((x - offset) / scale)`` in ``[-128, 127]``), with ``clipped_rows`` /
        ``clipped_values``: rows stored with values outside the ranges, and those values."""
        storage = self.storage
        info = dict(storage=storage, rerank=self.rerank, bytes_per_row=_core.row_bytes(self._dim, storage))
        if storage == "int8":
            raw = None if self._core is None else self._core.quantizer()
            info["trained"] = raw is not None
            if raw is not None:
                offset, scale = np.frombuffer(raw, dtype=np.float32).reshape(2, self._dim)
                info.update(offset=offset.copy(), scale=scale.copy(), low=offset - 128 * scale,
                            high=offset + 127 * scale)
            info.update(clipped_rows=0 if self._core is None else self._core.clipped_rows,
                        clipped_values=0 if self._core is None else self._core.clipped_values)
        return info

    # ---------------------------------------------------------------- writes
    def add_items(self, data: ArrayLike, ids: ArrayLike | None = None, num_threads: int = -1,
                  replace_deleted: bool = False, *, build: str = "auto", progress: bool | None = None) -> None:
        """Insert rows ``data`` (float32-castable ``[n, dim]`` or one ``[dim]`` row) under ``ids``
        (uint64 ``[n]``; default: consecutive labels as hnswlib).  An existing label is updated in
        place.  A batch that would exceed capacity is rejected whole.

        ``build`` (keyword-only): ``"cpu"`` inserts with the C engine alone; ``"gpu"`` (needs
        ``device="cuda"``) inserts in batches whose level-0 candidates come from the GPU: each new
        point's ``ef_construction`` nearest in the current graph (the search kernel) and its nearest
        among the other points of its batch (exact GPU search), so points of one batch link to each
        other; the C engine applies the heuristic and links them.  ``"auto"`` takes the GPU for large
        inserts (at least ``GPU_BUILD_MIN_ROWS`` rows) on a GPU index and the CPU otherwise.

        ``progress`` (keyword-only): show a tqdm bar; ``None`` shows one for inserts of at least
        ``_progress.ADD_ITEMS_MIN_ROWS`` rows when stderr is a terminal.
        """
        core = self._need_init()
        if build not in ("auto", "cpu", "gpu"):
            raise ValueError(f"build must be 'auto', 'cpu' or 'gpu', got {build!r}")
        if build == "gpu" and self._device != "cuda":
            raise DeviceError("build='gpu' needs an index on a GPU (device='cuda')")
        data = as_vectors(data, self._dim)
        rows = data.shape[0]
        labels = None if ids is None else as_labels(ids, rows)
        threads = threads_for(num_threads_rule(num_threads, default=self._num_threads), rows)
        with self._cur_l_lock:   # calls running at once take disjoint auto labels
            first = self._cur_l
            self._cur_l += rows
        # auto_resize: the capacity check and the insert it sized are one step, else two calls that
        # each fit alone both pass it and the second is refused (the engine inserts one at a time anyway)
        try:
            with self._grow_lock if self._auto_resize else contextlib.nullcontext():
                clipped = self._add_rows(core, data, np.arange(first, first + rows, dtype=np.uint64)
                                         if labels is None else labels, threads, replace_deleted, build, progress)
        except BaseException:
            with self._cur_l_lock:   # as hnswlib, a failed call leaves the counter (unless a later call moved it)
                if self._cur_l == first + rows:
                    self._cur_l = first
            raise
        if clipped:
            warnings.warn(f"add_items: {clipped} of {rows} rows had values outside the int8 ranges and were "
                          "clipped to them (storage_info() counts them; Index.train() sets the ranges from a "
                          "representative sample)", UserWarning, stacklevel=2)

    def _add_rows(self, core, data, labels, threads, replace_deleted, build, progress):
        """``add_items`` once its arguments are checked and its labels known; returns the rows
        clipped to the int8 ranges."""
        rows, capacity = data.shape[0], core.max_elements
        if self._auto_resize and core.count + rows > capacity:
            # only labels the index does not hold take a slot: updates (deleted labels included)
            # and repeats within the batch do not
            distinct = np.unique(labels)
            rows = distinct.size - int(popcount(np.frombuffer(core.allowed_bitset(distinct), np.uint32)[None])[0])
        if not (self._auto_resize and core.count + rows > capacity):
            return self._insert_rows(core, data, labels, threads, replace_deleted, build, progress)
        grown = max(core.count + rows, 2 * capacity)
        self.resize_index(grown)
        try:
            return self._insert_rows(core, data, labels, threads, replace_deleted, build, progress)
        except BaseException:
            # a rejected batch changes nothing, its capacity included (the caller holds _grow_lock;
            # not if a resize_index call moved it meanwhile, or a part of the batch went in)
            if core.max_elements == grown and core.count <= capacity:
                core.resize(capacity)
            raise

    def _insert_rows(self, core, data, labels, threads, replace_deleted, build, progress):
        """``_add_rows`` once the capacity is set; returns the rows clipped to the int8 ranges."""
        rows = data.shape[0]
        progress = progress_wanted(progress, rows, ADD_ITEMS_MIN_ROWS)
        use_gpu = build == "gpu" or (build == "auto" and self._device == "cuda" and rows >= GPU_BUILD_MIN_ROWS)
        # batches go in one by one: only take that path when no part can be refused (an all-new batch
        # fits; no deleted label whose update the engine refuses with allow_replace_deleted), so a
        # rejected insert still changes nothing
        in_parts = ((use_gpu or progress) and not replace_deleted and core.count + rows <= core.max_elements
                    and not (core.allow_replace_deleted and core.n_deleted))
        clipped = 0
        with Progress(in_parts and progress, rows, "add_items") as bar:
            if in_parts and use_gpu:
                clipped = self._add_assisted(data, labels, threads, bar)
            elif in_parts:
                step = max(ADD_ITEMS_MIN_ROWS // 10, rows // 100)
                for start in range(0, rows, step):
                    stop = min(rows, start + step)
                    clipped += core.add(data[start:stop], labels[start:stop], stop - start, threads, False)
                    bar.to(stop)
            else:
                clipped = core.add(data, labels, rows, threads, bool(replace_deleted))
        return clipped

    def _add_assisted(self, data, labels, threads, bar):
        """GPU-assisted insertion: the graph first grows on the CPU to GPU_BUILD_SEED elements, then
        batches of at most a quarter of the current graph take their candidates from the GPU.
        Returns the rows clipped to the int8 ranges."""
        core, start, n, clipped = self._core, 0, data.shape[0], 0
        while start < n:
            count = core.count
            if count < GPU_BUILD_SEED:
                stop = min(n, start + GPU_BUILD_SEED - count)
                clipped += core.add(data[start:stop], labels[start:stop], stop - start, threads, False)
            else:
                stop = min(n, start + max(1024, min(count // 4, GPU_BUILD_BATCH)))
                cands = self._gpu.insert_candidates(core, data[start:stop], self._space)
                clipped += core.add(data[start:stop], labels[start:stop], stop - start, threads, False,
                                    *(cands or ()))
            start = stop
            bar.to(stop)
        return clipped

    def mark_deleted(self, label: int | ArrayLike) -> None:
        """Hide ``label`` (one label, or an array of labels of any shape) from results; deleted
        elements stay in the graph as waypoints.  For an array every label is checked first (known,
        not yet deleted), so a rejected call deletes nothing."""
        self._set_deleted(label, True)

    def unmark_deleted(self, label: int | ArrayLike) -> None:
        """Undo :meth:`mark_deleted` for one label or an array of labels (checked first, as there)."""
        self._set_deleted(label, False)

    def _set_deleted(self, label, delete):
        core = self._need_init()
        op = core.mark_deleted if delete else core.unmark_deleted
        if np.ndim(label) == 0:
            op(as_label(label, TypeError))
            return
        for one in self._labels_in_state(core, label, deleted=not delete):
            op(int(one))

    @staticmethod
    def _labels_in_state(core, labels, *, deleted):
        """The distinct labels of ``labels`` (any shape) as uint64 ``[n]``, each known to the index
        and currently deleted (or not); otherwise hnswlib's RuntimeError, naming the label."""
        labels = np.unique(flat_labels(labels))
        for one in labels:
            slot, is_deleted = core.lookup(int(one))
            if slot < 0:
                raise RuntimeError(f"Label not found: {int(one)}")
            if bool(is_deleted) != deleted:
                raise RuntimeError(f"The requested to delete element is already deleted: {int(one)}" if not deleted
                                   else f"The requested to undelete element is not deleted: {int(one)}")
        return labels

    def resize_index(self, new_size: int) -> None:
        """Change capacity to ``new_size`` (not below the current count)."""
        core = self._need_init()
        new_size = as_int(new_size, "new_size", minimum=0)
        _check_memory(new_size, self._dim, core.M, MemoryError, core.storage, core.rerank)
        core.resize(new_size)

    # ---------------------------------------------------------------- search
    def knn_query(self, data: ArrayLike, k: int = 1, num_threads: int = -1, filter: Filter | None = None, *,
                  ef: int | None = None, pad: bool = False, search_width: int = 1,
                  filter_mode: str = "auto") -> tuple[Array, Array]:
        """The ``k`` nearest labels of each query row.

        Parameters
        ----------
        data : array-like, float32-castable ``[nq, dim]`` (or one ``[dim]`` row); NumPy, or a GPU
            array (CuPy, anything with ``__cuda_array_interface__`` or CUDA DLPack, e.g. torch)
        k : int
        num_threads : int, CPU threads over queries (<= 0: all cores)
        filter : None, or which labels may be returned:

            - a callable ``label -> bool`` (hnswlib style, called with the GIL; CPU only);
            - for every query: allowed labels (array-like or set), or a boolean mask over labels
              ``[n_labels]`` (``mask[label]`` True: allowed);
            - per query row: a boolean mask ``[nq, n_labels]``, an integer array ``[nq, m]``, or a
              list of ``nq`` label arrays / sets / masks.

            Label filters run in C or on the GPU (no Python calls).  Where a filter allows so few
            elements that exact search over them is cheaper than graph search, that query is
            answered exactly (see ``filter_mode``; the choice is logged at DEBUG level on the
            ``"gpuhnsw"`` logger).
        ef : int, keyword-only: beam width for this call (default: ``self.ef``); ``max(ef, k)`` is used
        pad : bool, keyword-only: where fewer than ``k`` are found, fill with label ``2**64-1`` and
            distance ``inf`` instead of raising ``RuntimeError``
        search_width : int, keyword-only, GPU only: parents expanded per beam iteration (1..32;
            1 follows the CPU order exactly)
        filter_mode : ``"auto"`` (default), ``"graph"`` or ``"exact"``, keyword-only: for label
            filters, choose per filter between graph search and exact search over the allowed rows
            by estimated cost (``"auto"``), or force one

        Returns
        -------
        labels : uint64 ``[nq, k]``, ascending distance
        distances : float32 ``[nq, k]``
            NumPy arrays for NumPy input; CuPy arrays for GPU input (no host round trip on the GPU).
        """
        params = SearchParams.of_query(k=k, ef=self._ef if ef is None else ef, num_threads=num_threads,
                                       search_width=search_width, filter_mode=filter_mode, pad=pad,
                                       default_threads=self._num_threads,
                                       device="cpu" if self._gpu is None else f"cuda:{self._gpu.ordinal}")
        return planner.knn_query(self._need_init(), self._gpu, self._space, data, filter, params)

    def range_query(self, data: ArrayLike, radius: float, *, max_results: int | None = None,
                    ef: int | None = None, num_threads: int = -1, filter: Filter | None = None,
                    filter_mode: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every label within ``radius`` of each query row (distance ``<= radius``), as CSR arrays.

        The graph search is asked for more neighbours (doubling ``k`` from ``max(ef, 16)``) until a
        row's farthest result lies beyond ``radius``, every live (allowed) element was returned,
        or ``max_results`` is reached; like :meth:`knn_query` it is approximate (exact for rows
        that a filter sends to exact search).

        Parameters
        ----------
        data : array-like ``[nq, dim]`` (or one ``[dim]`` row), as :meth:`knn_query`
        radius : float, in the index's distance (squared L2 for ``'l2'``)
        max_results : int, optional: at most this many results per row (the nearest)
        ef, num_threads, filter, filter_mode : as :meth:`knn_query`

        Returns
        -------
        offsets : int64 ``[nq + 1]``: row ``i``'s results are ``[offsets[i], offsets[i+1])``
        labels : uint64 ``[offsets[-1]]``, ascending distance within each row
        distances : float32 ``[offsets[-1]]``
        """
        core = self._need_init()
        radius = check_radius(radius, self._space)
        q = as_vectors(data, self._dim, what="query")
        limit = core.count - core.n_deleted
        if max_results is not None:
            limit = min(limit, as_int(max_results, "max_results", minimum=0))
        ef = self._ef if ef is None else as_int(ef, "ef", minimum=1)
        nq = q.shape[0]
        found = [None] * nq
        todo = np.arange(nq)
        k = min(limit, max(ef, 16))
        while todo.size and k > 0:
            labels, dists = self.knn_query(q[todo], k=k, num_threads=num_threads, ef=max(ef, k), pad=True,
                                           filter=filter_rows(filter, todo), filter_mode=filter_mode)
            # in float64: a radius beyond float32's range would round to inf there and take in the
            # padding (distance inf) as hits
            inside = dists.astype(np.float64) <= radius
            more = inside[:, -1] & (k < limit)  # all k inside: there may be more
            for j, row in enumerate(todo):
                if not more[j]:
                    found[row] = (labels[j][inside[j]], dists[j][inside[j]])
            todo = todo[more]
            k = min(limit, 2 * k)
        for row in todo:  # k reached 0 (nothing can be returned)
            found[row] = (np.zeros(0, np.uint64), np.zeros(0, np.float32))
        sizes = np.array([len(f[0]) if f is not None else 0 for f in found], dtype=np.int64)
        offsets = np.zeros(nq + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        labels = np.concatenate([f[0] for f in found if f is not None] or [np.zeros(0, np.uint64)])
        dists = np.concatenate([f[1] for f in found if f is not None] or [np.zeros(0, np.float32)])
        return offsets, labels.astype(np.uint64), dists.astype(np.float32)

    def sync(self) -> Any:
        """Bring the GPU copy of the graph up to date now; only rows changed since the last sync move.

        Done lazily before every GPU query, so calling it is optional (e.g. to take the cost out of
        the first query).  Returns the sync's counters (rows, bytes, seconds), or None on the CPU.
        """
        if self._gpu is None or self._core is None:
            return None
        return self._gpu.sync(self._core)

    # ---------------------------------------------------------------- reads
    def get_items(self, ids: ArrayLike | None = None, return_type: str = "numpy") -> np.ndarray | list:
        """Stored vectors of ``ids`` (cosine: normalised) as float32 ``[n, dim]`` or a list.

        ``ids`` may have any shape, e.g. the ``[nq, k]`` labels of :meth:`knn_query`; its labels are
        taken in row-major order (``n = ids.size``).  A float16 or int8 index returns its rows
        decoded (with ``rerank=True``: the exact rows)."""
        if return_type not in ("numpy", "list"):
            raise ValueError('return_type should be "numpy" or "list"')
        core = self._need_init()
        if ids is None:
            labels = np.zeros(0, dtype=np.uint64)
        else:
            if np.ndim(ids) == 0:
                raise ValueError("get_items accepts a list of indices and returns a list of vectors")
            labels = flat_labels(ids)
        out = np.empty((labels.shape[0], self._dim), dtype=np.float32)
        core.get_vectors(labels, out)
        return out if return_type == "numpy" else out.tolist()

    def get_ids_list(self) -> list[int]:
        """All labels, deleted ones included (as hnswlib)."""
        if self._core is None:
            return []
        return np.frombuffer(self._core.labels(), dtype=np.uint64).tolist()

    def get_neighbors(self, label: int, level: int = 0) -> np.ndarray:
        """Labels of ``label``'s neighbours on ``level`` (uint64 ``[degree]``)."""
        raw = self._need_init().neighbors(as_label(label), as_int(level, "level"))
        return np.frombuffer(raw, dtype=np.uint64).copy()

    def export_search_graph(self, degree: int = _search_graph.DEGREE, *, num_threads: int = -1,
                            return_ids: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The search graph made for batched search: each live element's level-0 neighbours, then
        the elements whose level-0 lists name it (reverse edges), nearest first, cut at ``degree``
        (1 .. 1024; default 64, the degree benchmarks/results/graph_replay.md chose).  Built by the
        C engine on ``num_threads`` threads (``-1``: the index's default); the same graph whatever
        the thread count.

        Returns uint64 ``[n_live, degree]``: row ``i`` holds labels, padded with ``NO_LABEL``
        (2**64 - 1), for the ``i``-th live label of :meth:`get_ids_list` (deleted labels have no
        row and are no one's neighbour).  With ``return_ids=True``, ``(ids, graph)``: ``ids`` uint64
        ``[n_live]`` the rows' labels, taken in the same snapshot (inserts, deletes and relabels
        beside the call cannot make them disagree).
        """
        core = self._need_init()
        ids, graph = _search_graph.export(core, degree, num_threads_rule(num_threads, default=self._num_threads))
        return (ids, graph) if return_ids else graph

    def get_levels(self, ids: ArrayLike) -> np.ndarray:
        """Top level of each label (uint8 ``[n]``)."""
        labels = as_labels(ids)
        out = np.empty(labels.shape[0], dtype=np.uint8)
        self._need_init().levels_of(labels, out)
        return out

    def check_integrity(self, *, require_reachable: bool = False) -> dict:
        """Check the graph from scratch (ids in range, no self loops or duplicate links, degrees
        within M0/M, neighbour levels, label map, deleted count).  Returns a dict of counts; raises
        ``RuntimeError`` naming the first problem.  ``require_reachable`` also fails on nodes the
        entry point cannot reach (pruning can legitimately strand a few)."""
        info = self._need_init().check_integrity()
        if require_reachable and info["n_unreachable"]:
            raise RuntimeError(f"{info['n_unreachable']} nodes are unreachable from the entry point")
        return info

    def memory_usage(self) -> int:
        """Bytes held by the index's arrays (capacity-sized, plus upper links; the stored rows at
        their storage's size, plus the float32 rows with ``rerank``, mapped or not; plus the search
        graph's host copy with ``search_graph="optimized"``)."""
        if self._core is None:
            return 0
        graph = self._graph
        return self._core.memory_bytes + (0 if graph is None else graph.rows.nbytes + graph.forward.nbytes)

    def __len__(self) -> int:
        """Live (not deleted) elements."""
        return 0 if self._core is None else self._core.count - self._core.n_deleted

    def __contains__(self, label: object) -> bool:
        """Whether ``label`` is stored and not deleted."""
        if self._core is None:
            return False
        try:
            label = as_label(label)
        except (TypeError, OverflowError):
            return False
        slot, deleted = self._core.lookup(label)
        return slot >= 0 and not deleted

    @property
    def count_deleted(self) -> int:
        """Elements marked deleted (they count in :meth:`get_current_count`, not in ``len``)."""
        return 0 if self._core is None else self._core.n_deleted

    # ---------------------------------------------------------------- persistence
    def save_index(self, path_to_index: IndexFile, *, format: str = "gpuhnsw") -> None:
        """Write the index to ``path_to_index``: a path or an fsspec URL (``"memory://a.idx"``,
        ``"s3://bucket/a.idx"``; written under a temporary name, then renamed or moved), or a binary
        file object (``io.BytesIO``, an open file, an fsspec file) at its position.

        ``format="gpuhnsw"`` (default): versioned, checksummed, keeps ``ef``, the storage (the
        stored rows as they are, the int8 quantiser) and the exact rows of ``rerank``; hnswlib cannot
        read it, gpuhnsw reads both.  ``format="hnswlib"``: hnswlib 0.8.0's layout, loadable by hnswlib itself; it holds float32
        rows only, so a float16 or int8 index writes its rows decoded (exact with ``rerank``; without,
        a ``UserWarning`` says the file holds the compressed values, not the original ones).
        """
        core = self._need_init()
        if format not in ("gpuhnsw", "hnswlib"):
            raise ValueError(f"format must be 'gpuhnsw' or 'hnswlib', got {format!r}")
        self._refuse_the_mapped_file(core, path_to_index)
        if format == "gpuhnsw":
            native.write_gpuhnsw(path_to_index, self._state_with_graph(core), ef=self._ef)
        else:
            if core.storage != "float32" and not core.rerank:
                warnings.warn(f"save_index(format='hnswlib'): hnswlib's format holds float32 rows; this index "
                              f"stores {core.storage}, so the file holds its rows decoded (lossy: not the rows "
                              "that were added)", UserWarning, stacklevel=2)
            hnswlib_format.write(path_to_index, core.export_state(decoded=True))

    def _state_with_graph(self, core):
        """``core``'s state, with its search graph (``"search_graph"``) where the mode keeps one and
        it covers the same rows: brought in step first (a GPU sync, or a build on a CPU index).
        Inserts running beside the save may leave the two apart; the file then holds no graph and
        the loaded index builds one at its first sync."""
        graph = None
        if self._graph is not None and self._gpu is not None:
            graph = self._gpu.graph_copy(core)
        elif self._graph is not None:   # nothing keeps it in step on the CPU: a fresh one
            built = _search_graph.SearchGraph()
            built.rebuild(core)
            graph = built.forward[:built.count], built.rows[:built.count]
        state = core.export_state()
        if graph is not None and len(graph[0]) == state["count"]:
            state["search_graph"] = graph
        return state

    def _refuse_the_mapped_file(self, core, target):
        """A file object open on the very file this index maps (same device and inode) must not be
        written: writing changes the rows under the mapping, and ``open(path, "wb")`` has already
        truncated it, taking the mapped rows with it (reading them would kill the process with
        SIGBUS).  Raises ValueError; after a truncation the index is unusable and says so."""
        if self._mapped_file is None or not core.mapped or not is_file_object(target):
            return
        try:
            st = os.fstat(target.fileno())
        except (AttributeError, OSError, ValueError):   # no file descriptor: not that file
            return
        dev, ino, size = self._mapped_file
        if (st.st_dev, st.st_ino) != (dev, ino):
            return
        advice = ("save to the path instead: save_index(path) writes a new file and renames it over the "
                  "old one, so the mapping keeps the old file")
        name = source_name(target)
        if st.st_size >= size:
            raise ValueError(f"{name} is the file this index is mapped from (load_index(mmap=True)); writing "
                             f"it in place would change the rows under the mapping. Nothing was written; {advice}")
        self._core, self._gpu = None, None   # its rows are gone from memory too: no call may read them
        self._lost = (f"this index was lost: {name}, the file it was mapped from, was truncated "
                      f"({size} -> {st.st_size} bytes) by opening it for writing, which took the mapped "
                      "vectors and level-0 links with it (only pages changed since the load survived, not "
                      "a whole index); load it again from another copy")
        raise ValueError(f"{self._lost}. Nothing was written; next time {advice}")

    def load_index(self, path_to_index: IndexFile, max_elements: int = 0,
                   allow_replace_deleted: bool = False, *, mmap: bool = False, verify: bool = False) -> None:
        """Load a file written by ``save_index`` in either format (or by hnswlib), detected from its
        first bytes; ``path_to_index`` is a path, an fsspec URL, or a binary file object (read from
        its position to its end).  The format found is logged at INFO level on the ``"gpuhnsw"``
        logger and named in the errors.  Capacity is
        ``max(max_elements, saved capacity)`` (an hnswlib file: as hnswlib, ``max_elements`` unless it
        is below the element count, then the saved capacity).  A bad file raises
        :class:`IndexFileError` naming the file and leaves this index as it was.

        ``mmap=True`` (keyword-only; a path to a file saved by this version's ``save_index``): the
        vectors and level-0 links are mapped from the file instead of read, so a large index opens
        without reading its vectors and processes that map one file share its pages.  The mapping is
        private copy-on-write: every call works as usual, and a write (``add_items``, an
        update, ``replace_deleted``) copies just the pages it touches into this process's memory;
        the file never changes.  Growing the capacity past the mapped one (``resize_index``, an
        ``auto_resize``) copies vectors and links into owned memory.  Saving to the same path is safe
        (the save replaces the file; the mapping keeps the old one), but the file must not be
        truncated or rewritten in place while mapped: ``save_index`` refuses a file object open on
        it (ValueError), and one opened with ``"wb"`` has truncated it already, which loses the
        index (every later call raises RuntimeError saying so, instead of a SIGBUS).  Checked at open: everything but the vectors
        (header, checksums, every link in range, the integrity check); ``verify=True`` also reads and
        checksums the vectors.  Files of version 1, hnswlib's format or a file object cannot be
        mapped: IndexFileError (ValueError for a file object), load them without mmap.

        Storage: a file's compressed rows (and exact rows) load as they are, and the index takes
        the file's storage; float32 rows (hnswlib files, float32 indexes) are encoded into the
        storage this Index was made with (``storage=`` / ``rerank=``; not with ``mmap``).
        """
        max_elements = as_int(max_elements, "max_elements", minimum=0)
        name = source_name(path_to_index)
        try:
            mapped_file = None
            if mmap:
                fmt = "gpuhnsw"
                with native.map_index(path_to_index, space=self._space, dim=self._dim, verify=verify) as opened:
                    graph = opened[0].pop("search_graph", None)
                    core, ef = self._core_from_file(name, *opened, "gpuhnsw", max_elements, allow_replace_deleted)
                    st = os.fstat(opened[2]["fd"])
                    # an empty file maps no page: nothing depends on it, and its inode number may
                    # go to another file once it is replaced (that file is no danger to this index)
                    mapped_file = (st.st_dev, st.st_ino, st.st_size) if core.count else None
            else:
                state, ef, fmt = native.read_index(path_to_index, space=self._space, dim=self._dim)
                graph = state.pop("search_graph", None)
                core, ef = self._core_from_file(name, state, ef, {}, fmt, max_elements, allow_replace_deleted)
        except FileNotFoundError as exc:
            raise IndexFileNotFoundError.of(exc, name) from None
        if graph is not None and self._search_graph_mode == "optimized":
            graph = _search_graph.SearchGraph.from_arrays(graph[1], graph[0], core)
        self._set_core(core, graph if self._search_graph_mode == "optimized" else None)
        self._mapped_file, self._lost = mapped_file, None
        self._ef = 10 if ef is None else ef
        self._cur_l = core.count
        _log.info("load_index: %s: %s's format%s, %d elements (%d deleted), capacity %d", name, fmt,
                  " (mapped)" if mmap else "", core.count, core.n_deleted, core.max_elements)

    def _core_from_file(self, name, state, ef, mapping, fmt, max_elements, allow_replace_deleted):
        """(Core, ef) from a file's state; ``mapping``: ``Core.from_state``'s keywords of a mapped load."""
        if fmt == "hnswlib":  # hnswlib's rule: the argument, unless it cannot hold the elements
            state["max_elements"] = max_elements if max_elements >= state["count"] else state["max_elements"]
        else:
            state["max_elements"] = max(max_elements, state["max_elements"])
        state["allow_replace_deleted"] = bool(allow_replace_deleted)
        return self._core_from_state(state, f"{name}: ", mapping), ef

    def _target_storage(self, state):
        """``Core.from_state``'s storage keywords for ``state``: none to keep what it holds, or this
        Index's requested storage for a float32 state's rows (the engine refuses any other change)."""
        held, exact = state.get("storage", "float32"), bool(state.get("rerank", False))
        want = self._storage_arg or held
        want_rerank = exact if self._rerank_arg is None else self._rerank_arg
        return {} if (want, want_rerank) == (held, exact) else dict(storage=want, rerank=want_rerank)

    def _core_from_state(self, state, where, mapping=None):
        """A Core from a checked state, in the storage ``_target_storage`` picks; the engine's
        complaints become IndexFileError starting with ``where``."""
        target = self._target_storage(state)
        _check_memory(state["max_elements"], self._dim, state["M"], IndexFileError,
                      target.get("storage", state.get("storage", "float32")),
                      target.get("rerank", state.get("rerank", False)))
        try:
            return _core.Core.from_state(state, **(mapping or {}), **target)
        except ValueError as exc:
            raise IndexFileError(f"{where}{exc}") from None

    def index_file_size(self) -> int:
        """Bytes ``save_index(..., format="hnswlib")`` writes (hnswlib's own measure)."""
        core = self._need_init()
        labels = np.frombuffer(core.labels(), dtype=np.uint64)
        levels = np.empty(labels.shape[0], dtype=np.uint8)
        core.levels_of(labels, levels)
        per_elem = 4 + 4 * core.M0 + 4 * self._dim + 8
        return 96 + core.count * (per_elem + 4) + int(levels.sum(dtype=np.int64)) * (4 + 4 * core.M)

    def __getstate__(self):
        if self._lost:
            raise RuntimeError(self._lost)
        if self._core is not None:
            state = self._core.export_state()
        else:   # what init_index will make
            state = {key: value for key, value in (("storage", self._storage_arg), ("rerank", self._rerank_arg))
                     if value is not None}
        state.update(space=self._space, dim=self._dim, ef=self._ef, num_threads=self._num_threads,
                     cur_l=self._cur_l, auto_resize=self._auto_resize, index_inited=self._core is not None,
                     search_graph=self._search_graph_mode, ser_version=1)
        return (state,)

    def __setstate__(self, state):
        state = check_state(state[0] if isinstance(state, tuple) and len(state) == 1 else state)
        self.__init__(state["space"], state["dim"], device="auto", search_graph=state.get("search_graph"))
        self._restore(state)

    def _restore(self, state):
        """Build from a state checked by ``_io.pickles.check_state``; any inconsistency the engine finds is
        an IndexFileError too, as for files."""
        self._ef = int(state.get("ef", 10))
        self._num_threads = num_threads_rule(state.get("num_threads", self._num_threads))
        self._auto_resize = bool(state.get("auto_resize", False))
        if state.get("index_inited", True):
            self._set_core(self._core_from_state(state, "index state: "))
            self._cur_l = int(state.get("cur_l", self._core.count))
        else:   # an uninitialised index: init_index makes the storage it was asked for
            if self._storage_arg is None and "storage" in state:
                self._storage_arg = state["storage"]
            if self._rerank_arg is None and "rerank" in state:
                self._rerank_arg = bool(state["rerank"])

    # ---------------------------------------------------------------- parameters
    def set_ef(self, ef: int) -> None:
        """Default beam width of :meth:`knn_query` (``max(ef, k)`` is used).  Not saved by
        hnswlib's format; kept by ours.  ``ef=0`` (which hnswlib takes and silently treats as
        ``k``) raises ``ValueError``."""
        ef = as_int(ef, "ef", minimum=0)
        if ef == 0:
            raise ValueError("ef must be at least 1 (the beam is max(ef, k) wide); got 0")
        self._ef = ef

    def get_max_elements(self) -> int:
        """Capacity in elements (0 before :meth:`init_index`)."""
        return 0 if self._core is None else self._core.max_elements

    def get_current_count(self) -> int:
        """Elements stored, deleted ones included (as hnswlib; ``len(index)`` counts live ones)."""
        return 0 if self._core is None else self._core.count

    ef = property(lambda self: self._ef, lambda self, value: self.set_ef(value),
                  doc="Default beam width of :meth:`knn_query` (read-write, see :meth:`set_ef`).")

    @property
    def M(self) -> int:
        """Links per node on the upper levels (``2*M`` on level 0); 0 before :meth:`init_index`."""
        return 0 if self._core is None else self._core.M

    @property
    def ef_construction(self) -> int:
        """Beam width while inserting; 0 before :meth:`init_index`."""
        return 0 if self._core is None else self._core.ef_construction

    @property
    def device(self) -> str:
        """Where queries run: ``"cpu"`` or ``"cuda"``."""
        return self._device

    @property
    def search_graph(self) -> str:
        """The graph the GPU search follows: ``"hnsw"`` or ``"optimized"`` (see the class docstring)."""
        return self._search_graph_mode

    @property
    def storage(self) -> str:
        """How vectors are stored: ``"float32"``, ``"float16"`` or ``"int8"`` (see the class docstring)."""
        return self._core.storage if self._core is not None else self._storage_arg or "float32"

    @property
    def rerank(self) -> bool:
        """Whether float32 rows are kept and the final candidates re-scored with them."""
        return self._core.rerank if self._core is not None else bool(self._rerank_arg)

    def _mirror_storage(self, storage):
        """The GPU mirror's row type for an index of ``storage``: ``gpu_storage`` where given, else
        float16 rows for both compressed storages (decoded on upload) and float32 for float32."""
        return self._gpu_storage_arg or ("float32" if storage == "float32" else "float16")
