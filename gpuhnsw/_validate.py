"""Input checks shared by Index, BFIndex, knn_graph and the CLI.

Each function returns the canonical form (C-contiguous array of the right dtype, plain int) or
raises the exception hnswlib raises for the same mistake, with a message that says what was wrong.
"""
import os

import numpy as np

from ._core import SPACES, STORAGES
from ._errors import DeviceError, InputShapeError
from .device.arrays import cuda_status, to_host

DEVICES = ("auto", "cpu", "cuda")


def check_radius(radius, space):
    """``radius`` of a range query as a float: finite, and >= 0 for l2 (ValueError)."""
    radius = float(radius)
    if not np.isfinite(radius) or radius < 0 and space == "l2":
        raise ValueError(f"radius must be finite (and >= 0 for l2), got {radius}")
    return radius


def check_space(space):
    if not isinstance(space, str) or space not in SPACES:
        raise RuntimeError("Space name must be one of l2, ip, or cosine.")
    return space


def check_storage(storage):
    """``storage`` of an Index: one of ``_core.STORAGES``."""
    if not isinstance(storage, str) or storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(map(repr, STORAGES))}, got {storage!r}")
    return storage


def check_dim(dim):
    dim = as_int(dim, "dim")
    if dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    return dim


def as_int(value, name, *, minimum=None):
    """A Python int from an integer-like value; ``TypeError`` for non-integers and bools, and for
    values below ``minimum`` (hnswlib's size_t arguments reject negatives with TypeError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise TypeError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_matrix(arr, dim=None, what="data"):
    """``arr`` (NumPy or CuPy) as 2-D ``[n, dim]``: 1-D input is one row; any other shape, or a width
    other than ``dim``, raises :class:`InputShapeError` with hnswlib's wording."""
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    elif arr.ndim != 2:
        raise InputShapeError(f"Input vector data wrong shape. Number of dimensions {arr.ndim}. "
                              "Data must be a 1D or 2D array.")
    if dim is not None and arr.shape[1] != dim and arr.shape[0] > 0:
        raise InputShapeError(f"Wrong dimensionality of the vectors: {what} has width {arr.shape[1]}, "
                              f"the index has dim {dim}")
    return arr


_DLPACK_CPU = 1  # DLDeviceType kDLCPU


def plain_array(x):
    """``x`` in a form NumPy (or CuPy, on the GPU) reads as it is, for tensors straight from a model.

    A torch tensor is detached from its autograd graph and bfloat16 becomes float32, on its own
    device (torch is not imported here); a NumPy array of ml_dtypes' bfloat16 becomes float32; a
    host DLPack producer without the NumPy array protocols is read through ``np.from_dlpack``.
    Anything else comes back unchanged.
    """
    if hasattr(x, "requires_grad") and hasattr(x, "detach"):  # torch.Tensor
        x = x.detach()
        return x.float() if str(x.dtype) == "torch.bfloat16" else x
    if isinstance(x, np.ndarray):
        return x.astype(np.float32) if x.dtype.name == "bfloat16" else x
    if (hasattr(x, "__dlpack__") and not hasattr(x, "__array__") and not hasattr(x, "__array_interface__")
            and not hasattr(x, "__cuda_array_interface__")):
        try:
            on_host = int(x.__dlpack_device__()[0]) == _DLPACK_CPU
        except Exception:
            on_host = False
        if on_host:
            try:
                return np.from_dlpack(x)
            except (BufferError, TypeError, RuntimeError) as exc:
                raise ValueError(f"cannot read the {type(x).__name__} through DLPack ({exc}); "
                                 "pass a float32 array") from None
    return x


def on_host(x):
    """``x`` as :func:`plain_array` reads it, and for a GPU array its host copy: what the CPU paths
    take."""
    x = plain_array(x)
    return to_host(x)


def as_vectors(data, dim=None, what="data"):
    """``data`` (host or GPU) as a C-contiguous float32 NumPy matrix ``[n, dim]``; 1-D input is one row.

    Wrong shape or width raises :class:`InputShapeError` (a ``ValueError`` and a ``RuntimeError``);
    NaN, infinities and non-numeric data raise ``ValueError``.
    """
    arr = np.asarray(on_host(data))  # a GPU array on a CPU path: the host copy
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{what} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{what} must be real, got dtype {arr.dtype}")
    arr = as_matrix(arr, dim, what)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # min/max propagate NaN and show infinities without an [n, dim] temporary (np.isfinite(arr)
    # would allocate n*dim bytes: 47 MB for mnist, more than the index's own growth)
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise not_finite(what, int(np.argwhere(~np.isfinite(arr))[0, 0]))
    return arr


def not_finite(what, row):
    """The ValueError for NaN or an infinity in row ``row`` of ``what`` (the host check above, and the
    GPU leg's from the search kernel's status bit)."""
    return ValueError(f"{what} holds NaN or infinite values (first in row {row}; values beyond "
                      "the float32 range become infinite)")


def as_label(label, out_of_range=OverflowError):
    """One label as a Python int in [0, 2**64).  Outside that range hnswlib raises OverflowError
    where labels arrive in an array and TypeError where one label is an argument: ``out_of_range``."""
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"label must be an integer, got {type(label).__name__}")
    label = int(label)
    if label < 0 or label >= 1 << 64:
        raise out_of_range(f"label {label} is out of range for uint64")
    return label


def label_array(ids):
    """``np.asarray(ids)`` for labels (a set becomes a list first; NumPy picks int64, uint64 or,
    beyond both, object), except that a sequence of Python ints stays exact: for ints that fit
    neither int64 nor uint64 together (``[2**63, 5]``) NumPy makes float64, which rounds above 2**53,
    so those come back as an object array of the ints, which :func:`as_labels` checks one by one."""
    if isinstance(ids, (set, frozenset)):
        ids = list(ids)
    arr = np.asarray(ids)
    if arr.dtype.kind == "f" and not isinstance(ids, np.ndarray):
        exact = np.asarray(ids, dtype=object)
        if all(isinstance(x, (int, np.integer)) for x in exact.flat):
            return exact
    return arr


def as_labels(ids, rows=None):
    """Labels (an array-like or a set, host or GPU) as uint64 ``[rows]``; a scalar is allowed for one row.
    Labels outside [0, 2**64) raise ``OverflowError``, a length mismatch ``RuntimeError`` (both as
    hnswlib)."""
    arr = label_array(on_host(ids))
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or (rows is not None and arr.shape[0] != rows):
        got = arr.shape[0] if arr.ndim == 1 else arr.shape
        raise InputShapeError(f"The input label shape {got} does not match the input data vector shape {rows}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.dtype == object:
        return np.array([as_label(x) for x in arr], dtype=np.uint64)
    if np.issubdtype(arr.dtype, np.signedinteger):
        if (arr < 0).any():
            raise OverflowError(f"Python integer {int(arr[arr < 0][0])} out of bounds for uint64")
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.floor(arr)).any():
            raise ValueError("labels must be integers")
        outside = (arr < 0) | (arr >= 2.0**64)   # a cast would wrap them (1e20 became label 0)
        if outside.any():
            raise OverflowError(f"label {float(arr[outside][0])} is out of range for uint64")
    elif not np.issubdtype(arr.dtype, np.unsignedinteger):
        raise TypeError(f"labels must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def flat_labels(ids):
    """Labels of any shape (e.g. the ``[nq, k]`` labels of ``knn_query``), host or GPU, as uint64
    ``[n]`` in row-major order; errors as :func:`as_labels`."""
    return as_labels(np.ravel(label_array(on_host(ids))))


# Where the kernel shows this process's cgroups (v1 or v2) and their memory limits.
_PROC_CGROUP = "/proc/self/cgroup"
_CGROUP_ROOT = "/sys/fs/cgroup"


def cpu_count():
    """The CPUs this process may run on: its affinity mask (``taskset``, batch schedulers), where
    the OS has one, else every core.  The default thread count everywhere."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_memory_limits():
    """Memory limits (bytes) of this process's cgroup and its ancestors, from cgroup v2
    (``memory.max``) or v1 (``memory.limit_in_bytes``); "max" and v1's huge 'unlimited' read as no
    limit.  Empty where there is no cgroup filesystem."""
    try:
        with open(_PROC_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            base, name = _CGROUP_ROOT, "memory.max"                       # v2, unified
        elif "memory" in controllers.split(","):
            base, name = os.path.join(_CGROUP_ROOT, "memory"), "memory.limit_in_bytes"   # v1
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):                          # the group, then its parents
            try:
                with open(os.path.join(base, *parts[:depth], name)) as f:
                    value = f.read().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 1 << 60:
                limits.append(int(value))
    return limits


def memory_limit():
    """Bytes of memory this process may use, or None where unknown: the machine's memory, or a
    tighter cgroup limit (a container's).  The bound on what an untrusted number (a file's capacity,
    a request's k) may make us allocate."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        have = None
    limits = _cgroup_memory_limits() + ([have] if have else [])
    return min(limits) if limits else None


# Most CPU threads one call may ask for (or the core count, where that is larger): every worker is a
# pthread (stack reserved per thread) and every searching one holds a visited table of 2 bytes per
# slot, kept by the index for reuse; past the cores they only contend, and the count is kept in a C
# int (docs/architecture.md, "Index semantics").
MAX_THREADS = 1024


def thread_limit():
    """The largest ``num_threads`` accepted here: ``max(MAX_THREADS, cores)``."""
    return max(MAX_THREADS, os.cpu_count() or 1, cpu_count())


def threads_for(n, rows):
    """hnswlib's rule for a call over ``rows`` rows with ``n`` threads: small batches are not worth
    threads (1 thread up to ``4 * n`` rows)."""
    return 1 if rows <= 4 * n else n


def num_threads(n, default=None):
    """hnswlib's rule: ``n <= 0`` means ``default`` (every CPU this process may use unless given); more than
    :func:`thread_limit` is a ``ValueError`` (``TypeError`` for a non-integer)."""
    n = as_int(n, "num_threads")
    if n <= 0:
        return default if default is not None else cpu_count()
    if n > thread_limit():
        raise ValueError(f"num_threads must be at most {thread_limit()} (<= 0 uses every core, "
                         f"{cpu_count()} here), got {n}")
    return n


def resolve_device(device):
    """``"auto" | "cpu" | "cuda" | "cuda:N"`` -> ``("cpu", None)`` or ``("cuda", N)``.

    ``"auto"`` picks the GPU when CuPy sees one and the CPU otherwise; asking for a GPU that cannot
    be used raises :class:`DeviceError` saying why.
    """
    ordinal = 0
    if isinstance(device, str) and device.startswith("cuda:"):
        tail = device[5:]
        if not tail.isdigit():
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        ordinal, device = int(tail), "cuda"
    if not isinstance(device, str) or device not in DEVICES:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "cpu":
        return "cpu", None
    count, why = cuda_status()
    if not count:
        if device == "auto":
            return "cpu", None
        raise DeviceError(f"device={device!r} was requested but no GPU can be used: {why}")
    if ordinal >= count:
        raise DeviceError(f"device 'cuda:{ordinal}' requested but only {count} GPU(s) are visible")
    return "cuda", ordinal
