/* gpuhnsw._core: the Python type `Core` over ghnsw_index_t.  Plain CPython API, no numpy headers:
 * arrays come in as C-contiguous buffers (the Python layer checks dtype and shape; this file checks
 * byte lengths), outputs are buffers allocated by the caller.  The GIL is released around every call
 * that touches many rows. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"

typedef struct {
    PyObject_HEAD
    ghnsw_index_t *ix;
} CoreObject;

static PyTypeObject CoreType;
static const char *SPACES[] = {"l2", "ip", "cosine"};
static const char *STORAGES[GHNSW_N_STORAGES] = {"float32", "float16", "int8"}; /* ghnsw_storage_t order */

static PyObject *raise_status(ghnsw_status_t st, const ghnsw_err_t *err, PyObject *corrupt_type) {
    if (st == GHNSW_ECALLBACK) return NULL; /* exception already set */
    PyObject *type = PyExc_RuntimeError;
    if (st == GHNSW_ENOMEM) type = PyExc_MemoryError;
    else if (st == GHNSW_EINVAL) type = PyExc_ValueError;
    else if (st == GHNSW_ECORRUPT) type = corrupt_type;
    PyErr_SetString(type, err->msg[0] ? err->msg : "gpuhnsw internal error");
    return NULL;
}

/* Checks a buffer's byte length; all arrays are C-contiguous by the format used to get them. */
static int check_len(const Py_buffer *b, size_t want, const char *name) {
    if ((size_t)b->len != want) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zu bytes, got %zd", name, want, b->len);
        return -1;
    }
    return 0;
}

static int parse_space(const char *s) {
    for (int i = 0; i < 3; i++) if (!strcmp(s, SPACES[i])) return i;
    return -1;
}

static int parse_storage(const char *s) {
    for (int i = 0; i < GHNSW_N_STORAGES; i++) if (!strcmp(s, STORAGES[i])) return i;
    return -1;
}

static int Core_init(CoreObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"space", "dim", "max_elements", "M", "ef_construction", "random_seed",
                             "allow_replace_deleted", "storage", "rerank", NULL};
    const char *space, *storage = "float32";
    unsigned long long dim, cap, M, efc, seed;
    int allow = 0, rerank = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sKKKKK|psp", kwlist, &space, &dim, &cap, &M, &efc, &seed, &allow,
                                     &storage, &rerank))
        return -1;
    int sp = parse_space(space), sto = parse_storage(storage);
    if (sp < 0) { PyErr_SetString(PyExc_ValueError, "space must be one of l2, ip, or cosine"); return -1; }
    if (sto < 0) { PyErr_SetString(PyExc_ValueError, "storage must be one of float32, float16, or int8"); return -1; }
    if (dim > GHNSW_MAX_DIM || M > GHNSW_MAX_M || efc > GHNSW_MAX_EF_CONSTRUCTION || cap > GHNSW_MAX_CAPACITY) {
        PyErr_SetString(PyExc_ValueError, "parameter out of range");
        return -1;
    }
    if (self->ix) { PyErr_SetString(PyExc_RuntimeError, "Core is already initialised"); return -1; }
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    Py_BEGIN_ALLOW_THREADS
    st = ghnsw_create(&self->ix, sp, (uint32_t)dim, (uint32_t)cap, (uint32_t)M, (uint32_t)efc, seed, allow, sto,
                      rerank, &err);
    Py_END_ALLOW_THREADS
    if (st) { raise_status(st, &err, PyExc_ValueError); return -1; }
    return 0;
}

static void Core_dealloc(CoreObject *self) {
    ghnsw_free(self->ix);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define IX(self) ((self)->ix)
#define NEED_IX(self) do { if (!(self)->ix) { PyErr_SetString(PyExc_RuntimeError, "Core not initialised"); return NULL; } } while (0)

static PyObject *Core_add(CoreObject *self, PyObject *args) {
    Py_buffer data, labels, gc = {0}, bc = {0};
    Py_ssize_t n;
    int threads, replace;
    PyObject *graph_obj = Py_None, *batch_obj = Py_None;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*y*nip|OO", &data, &labels, &n, &threads, &replace, &graph_obj, &batch_obj))
        return NULL;
    PyObject *ret = NULL;
    int have_g = 0, have_b = 0;
    ghnsw_cands_t cands = {NULL, 0, NULL, 0};
    if (n < 0 || check_len(&data, (size_t)n * IX(self)->dim * 4, "data") || check_len(&labels, (size_t)n * 8, "labels"))
        goto out;
    /* optional candidates: uint32 [n, c_graph] graph slots and [n, c_batch] batch rows */
    if (graph_obj != Py_None || batch_obj != Py_None) {
        if (graph_obj == Py_None || batch_obj == Py_None) {
            PyErr_SetString(PyExc_ValueError, "graph and batch candidates come together");
            goto out;
        }
        if (PyObject_GetBuffer(graph_obj, &gc, PyBUF_SIMPLE) < 0) goto out;
        have_g = 1;
        if (PyObject_GetBuffer(batch_obj, &bc, PyBUF_SIMPLE) < 0) goto out;
        have_b = 1;
        if (n == 0 || gc.len % (4 * n) || bc.len % (4 * n)) {
            PyErr_SetString(PyExc_ValueError, "candidate arrays must be uint32 [n, c]");
            goto out;
        }
        cands.graph = gc.buf;
        cands.n_graph = (uint32_t)(gc.len / (4 * n));
        cands.batch = bc.buf;
        cands.n_batch = (uint32_t)(bc.len / (4 * n));
    }
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    const ghnsw_cands_t *cp = have_g ? &cands : NULL;
    uint64_t clipped = 0;
    Py_BEGIN_ALLOW_THREADS
    st = ghnsw_add(IX(self), data.buf, labels.buf, (size_t)n, threads, replace, cp, &clipped, &err);
    Py_END_ALLOW_THREADS
    if (st) raise_status(st, &err, PyExc_RuntimeError);
    else ret = PyLong_FromUnsignedLongLong(clipped);
out:
    if (have_g) PyBuffer_Release(&gc);
    if (have_b) PyBuffer_Release(&bc);
    PyBuffer_Release(&data);
    PyBuffer_Release(&labels);
    return ret;
}

/* A Python filter callable, called from worker threads with the GIL taken for each call (as hnswlib).
 * The first exception is carried back to the calling thread. */
typedef struct {
    PyObject *fn;
    PyObject *exc_type, *exc_value, *exc_tb;
    pthread_mutex_t lock;
} pyfilter_t;

static int call_filter(void *vctx, uint64_t label, int *allowed) {
    pyfilter_t *f = vctx;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = 0;
    PyObject *arg = PyLong_FromUnsignedLongLong(label);
    PyObject *res = arg ? PyObject_CallOneArg(f->fn, arg) : NULL;
    Py_XDECREF(arg);
    int truth = res ? PyObject_IsTrue(res) : -1;
    Py_XDECREF(res);
    if (truth < 0) {
        rc = -1;
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        if (!f->exc_type) { f->exc_type = t; f->exc_value = v; f->exc_tb = tb; }
        else { Py_XDECREF(t); Py_XDECREF(v); Py_XDECREF(tb); }
    } else {
        *allowed = truth;
    }
    PyGILState_Release(g);
    return rc;
}

/* search(queries, out_labels, out_dists, out_found, *, k, beam, num_threads=0, allowed=None,
 *        allowed_stride=0, filter=None, slots=False): nq is out_found's length. */
static PyObject *Core_search(CoreObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"queries", "out_labels", "out_dists", "out_found", "k", "beam", "num_threads",
                             "allowed", "allowed_stride", "filter", "slots", NULL};
    Py_buffer q, ol, od, of, bits = {0};
    unsigned long long k, beam;
    int threads = 0, want_slots = 0;
    PyObject *bits_obj = Py_None, *callback = Py_None;
    Py_ssize_t stride = 0;
    NEED_IX(self);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*w*w*w*KK|$iOnOp", kwlist, &q, &ol, &od, &of, &k, &beam, &threads,
                                     &bits_obj, &stride, &callback, &want_slots))
        return NULL;
    PyObject *ret = NULL;
    ghnsw_index_t *ix = IX(self);
    int have_bits = 0;
    ghnsw_filter_t filter = {NULL, 0, 0, NULL, NULL};
    pyfilter_t pf = {NULL, NULL, NULL, NULL};
    size_t nq = (size_t)of.len / 4;
    if (k > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "k is beyond 2**32 - 1");
        goto out;
    }
    if (beam > UINT32_MAX) beam = UINT32_MAX; /* a beam wider than the index holds nothing more */
    if (check_len(&of, nq * 4, "found out") || check_len(&q, nq * ix->dim * 4, "queries") ||
        check_len(&ol, nq * k * 8, "labels out") || check_len(&od, nq * k * 4, "distances out"))
        goto out;
    if (bits_obj != Py_None) {
        if (PyObject_GetBuffer(bits_obj, &bits, PyBUF_SIMPLE) < 0) goto out;
        have_bits = 1;
        /* a bitset may be shorter than the index (made before a resize): the engine treats the
         * slots past it as not allowed */
        if (stride < 0 || (stride > 0 && (size_t)bits.len < nq * (size_t)stride * 4)) {
            PyErr_SetString(PyExc_ValueError, "per-query filter bitsets are shorter than nq rows of the stride");
            goto out;
        }
        filter.allowed_bits = bits.buf;
        filter.words = stride ? (size_t)stride : (size_t)bits.len / 4;
        filter.per_query = stride > 0;
    }
    if (callback != Py_None) {
        pf.fn = callback;
        filter.callback = call_filter;
        filter.callback_ctx = &pf;
    }
    ghnsw_search_params_t params = {(uint32_t)k, (uint32_t)beam, threads, (have_bits || pf.fn) ? &filter : NULL, want_slots};
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    Py_BEGIN_ALLOW_THREADS
    st = ghnsw_search(ix, q.buf, nq, &params, ol.buf, od.buf, of.buf, &err);
    Py_END_ALLOW_THREADS
    if (pf.exc_type) PyErr_Restore(pf.exc_type, pf.exc_value, pf.exc_tb);
    else if (st) raise_status(st, &err, PyExc_RuntimeError);
    else ret = Py_NewRef(Py_None);
out:
    if (have_bits) PyBuffer_Release(&bits);
    PyBuffer_Release(&q); PyBuffer_Release(&ol); PyBuffer_Release(&od); PyBuffer_Release(&of);
    return ret;
}

/* Outputs whose size the engine knows only under its locks: Python bytes objects, each made with the
 * GIL taken for the allocation alone.  Safe because this file never waits for an engine lock while
 * holding the GIL (every engine call runs with the GIL released). */
#define MAX_OUTS GHNSW_EXPORT_BUFFERS
typedef struct { PyObject *objs[MAX_OUTS]; int n; } outs_t;

static void *alloc_bytes(void *ctx, size_t bytes) {
    outs_t *o = ctx;
    void *p = NULL;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *b = o->n < MAX_OUTS && bytes <= PY_SSIZE_T_MAX ? PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bytes) : NULL;
    if (b) { o->objs[o->n++] = b; p = PyBytes_AS_STRING(b); }
    else PyErr_Clear(); /* the engine reports GHNSW_ENOMEM */
    PyGILState_Release(g);
    return p;
}

static void outs_clear(outs_t *o) {
    for (int i = 0; i < o->n; i++) Py_CLEAR(o->objs[i]);
    o->n = 0;
}

/* The single output of a reader, or NULL with its exception set. */
static PyObject *one_out(ghnsw_status_t st, const ghnsw_err_t *err, outs_t *o) {
    if (st) { outs_clear(o); return raise_status(st, err, PyExc_RuntimeError); }
    return o->objs[0];
}

#define CALL_NOGIL(st, call) do { Py_BEGIN_ALLOW_THREADS (st) = (call); Py_END_ALLOW_THREADS } while (0)

/* int8 ranges low[dim] <= high[dim] before the first row is stored; integral[dim] (optional, uint8):
 * the dimension's values are integers */
static PyObject *Core_train(CoreObject *self, PyObject *args) {
    Py_buffer lo, hi, integral = {0};
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*y*|y*", &lo, &hi, &integral)) return NULL;
    PyObject *ret = NULL;
    size_t dim = IX(self)->dim;
    if (!check_len(&lo, dim * 4, "low") && !check_len(&hi, dim * 4, "high") &&
        (!integral.obj || !check_len(&integral, dim, "integral"))) {
        ghnsw_err_t err = {{0}};
        ghnsw_status_t st;
        CALL_NOGIL(st, ghnsw_train(IX(self), lo.buf, hi.buf, integral.obj ? integral.buf : NULL, &err));
        ret = st ? raise_status(st, &err, PyExc_ValueError) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&lo);
    PyBuffer_Release(&hi);
    if (integral.obj) PyBuffer_Release(&integral);
    return ret;
}

/* The int8 quantiser, offsets then scales, or None while untrained. */
static PyObject *Core_quantizer(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_index_t *ix = IX(self);
    float *copy = malloc(2 * (size_t)ix->dim * sizeof(float));
    if (!copy) return PyErr_NoMemory();
    int trained;
    CALL_NOGIL(trained, ghnsw_get_quantizer(ix, copy));
    PyObject *ret = trained ? PyBytes_FromStringAndSize((const char *)copy, 2 * (Py_ssize_t)ix->dim * sizeof(float))
                            : Py_NewRef(Py_None);
    free(copy);
    return ret;
}

/* labels -> bitset over slots (unknown labels are ignored: they cannot be returned anyway) */
static PyObject *Core_allowed_bitset(CoreObject *self, PyObject *args) {
    Py_buffer lab;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*", &lab)) return NULL;
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    outs_t o = {{0}, 0};
    CALL_NOGIL(st, ghnsw_allowed_bitset(IX(self), lab.buf, (size_t)lab.len / 8, alloc_bytes, &o, &err));
    PyBuffer_Release(&lab);
    return one_out(st, &err, &o);
}

static PyObject *label_op(CoreObject *self, PyObject *args,
                          ghnsw_status_t (*op)(ghnsw_index_t *, uint64_t, ghnsw_err_t *)) {
    unsigned long long label;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "K", &label)) return NULL;
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    CALL_NOGIL(st, op(IX(self), label, &err));
    if (st) return raise_status(st, &err, PyExc_RuntimeError);
    Py_RETURN_NONE;
}
static PyObject *Core_mark_deleted(CoreObject *self, PyObject *args) { return label_op(self, args, ghnsw_mark_deleted); }
static PyObject *Core_unmark_deleted(CoreObject *self, PyObject *args) { return label_op(self, args, ghnsw_unmark_deleted); }

static PyObject *Core_resize(CoreObject *self, PyObject *args) {
    unsigned long long n;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "K", &n)) return NULL;
    if (n > GHNSW_MAX_CAPACITY) { PyErr_SetString(PyExc_ValueError, "max_elements must be below 2**31"); return NULL; }
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    CALL_NOGIL(st, ghnsw_resize(IX(self), (uint32_t)n, &err));
    if (st) return raise_status(st, &err, PyExc_RuntimeError);
    Py_RETURN_NONE;
}

/* (slot or -1, deleted) of a label */
static PyObject *Core_lookup(CoreObject *self, PyObject *args) {
    unsigned long long label;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "K", &label)) return NULL;
    int64_t slot;
    int deleted;
    ghnsw_status_t st;
    CALL_NOGIL(st, ghnsw_find(IX(self), label, &slot, &deleted));
    (void)st;
    return Py_BuildValue("(LO)", (long long)slot, deleted ? Py_True : Py_False);
}

/* Vectors of live labels into out[n, dim]; a missing or deleted label raises "Label not found". */
static PyObject *Core_get_vectors(CoreObject *self, PyObject *args) {
    Py_buffer lab, out;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*w*", &lab, &out)) return NULL;
    size_t n = (size_t)lab.len / 8;
    PyObject *ret = NULL;
    if (!check_len(&out, n * IX(self)->dim * 4, "out")) {
        ghnsw_err_t err = {{0}};
        ghnsw_status_t st;
        CALL_NOGIL(st, ghnsw_get_vectors(IX(self), lab.buf, n, out.buf, &err));
        ret = st ? raise_status(st, &err, PyExc_RuntimeError) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&lab);
    PyBuffer_Release(&out);
    return ret;
}

/* All labels in slot order (deleted included, as hnswlib's get_ids_list). */
static PyObject *Core_labels(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    outs_t o = {{0}, 0};
    CALL_NOGIL(st, ghnsw_labels(IX(self), alloc_bytes, &o, &err));
    return one_out(st, &err, &o);
}

/* The search graph (search_graph.c): bytes u32[count, degree], or a tuple of it and the outputs asked
 * for (labels, live; forward counts). */
static PyObject *Core_build_search_graph(CoreObject *self, PyObject *args) {
    long long degree;
    int threads, with_labels = 0, with_forward = 0;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "Li|pp", &degree, &threads, &with_labels, &with_forward)) return NULL;
    int outputs = (with_labels ? GHNSW_GRAPH_LABELS : 0) | (with_forward ? GHNSW_GRAPH_FORWARD : 0);
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    outs_t o = {{0}, 0};
    CALL_NOGIL(st, ghnsw_build_search_graph(IX(self), degree, threads, outputs, alloc_bytes, &o, &err));
    if (st || !outputs) return one_out(st, &err, &o);
    PyObject *t = PyTuple_New(o.n);
    if (!t) { outs_clear(&o); return NULL; }
    for (int i = 0; i < o.n; i++) PyTuple_SET_ITEM(t, i, o.objs[i]);
    return t;
}

/* Update a built search graph in place: update_search_graph(rows u32[n, degree] (writable), fdeg u32[n]
 * (writable), slots u32[m] ascending, renew u8[m], threads) -> bytes u32[] of the rows written. */
static PyObject *Core_update_search_graph(CoreObject *self, PyObject *args) {
    Py_buffer rows, fdeg, sl, re;
    int threads;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "w*w*y*y*i", &rows, &fdeg, &sl, &re, &threads)) return NULL;
    size_t n = (size_t)fdeg.len / 4, m = (size_t)sl.len / 4;
    PyObject *ret = NULL;
    if (n == 0 || rows.len % (Py_ssize_t)(4 * n) != 0 || sl.len % 4 != 0) {
        PyErr_SetString(PyExc_ValueError, "rows must be u32[n, degree], fdeg u32[n] (n >= 1) and slots u32[m]");
    } else if (!check_len(&re, m, "renew")) {
        ghnsw_err_t err = {{0}};
        ghnsw_status_t st;
        outs_t o = {{0}, 0};
        CALL_NOGIL(st, ghnsw_update_search_graph(IX(self), rows.buf, fdeg.buf, (int64_t)(rows.len / 4 / (Py_ssize_t)n),
                                                 n, sl.buf, re.buf, m, threads, alloc_bytes, &o, &err));
        ret = one_out(st, &err, &o);
    }
    PyBuffer_Release(&rows); PyBuffer_Release(&fdeg); PyBuffer_Release(&sl); PyBuffer_Release(&re);
    return ret;
}

/* Labels of a label's neighbours on one level. */
static PyObject *Core_neighbors(CoreObject *self, PyObject *args) {
    unsigned long long label;
    int level;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "Ki", &label, &level)) return NULL;
    uint64_t *lab = malloc(sizeof(uint64_t) * (IX(self)->M0 + 1));
    if (!lab) return PyErr_NoMemory();
    uint32_t n = 0;
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    CALL_NOGIL(st, ghnsw_neighbors(IX(self), label, level, lab, &n, &err));
    PyObject *b = st ? raise_status(st, &err, PyExc_RuntimeError)
                     : PyBytes_FromStringAndSize((const char *)lab, (Py_ssize_t)n * 8);
    free(lab);
    return b;
}

static PyObject *Core_levels_of(CoreObject *self, PyObject *args) {
    Py_buffer lab, out;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*w*", &lab, &out)) return NULL;
    size_t n = (size_t)lab.len / 8;
    PyObject *ret = NULL;
    if (!check_len(&out, n, "out")) {
        ghnsw_err_t err = {{0}};
        ghnsw_status_t st;
        CALL_NOGIL(st, ghnsw_levels_of(IX(self), lab.buf, n, out.buf, &err));
        ret = st ? raise_status(st, &err, PyExc_RuntimeError) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&lab);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *Core_check_integrity(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_integrity_t info;
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    CALL_NOGIL(st, ghnsw_check_integrity(IX(self), &info, &err));
    if (st) return raise_status(st, &err, PyExc_RuntimeError);
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:i}", "n_live", (Py_ssize_t)info.n_live, "n_deleted",
                         (Py_ssize_t)info.n_deleted, "n_edges", (Py_ssize_t)info.n_edges, "n_unreachable",
                         (Py_ssize_t)info.n_unreachable, "max_level", info.max_level);
}

/* sync_pending(drain) -> bool: whether a mirror whose last drain was number `drain` has anything to
 * sync (O(1): the engine's dirty flag and drain counter; no lock, the GIL kept). */
static PyObject *Core_sync_pending(CoreObject *self, PyObject *arg) {
    NEED_IX(self);
    unsigned long long since = PyLong_AsUnsignedLongLong(arg);
    if (since == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(ghnsw_sync_pending(IX(self), since));
}

/* The dirty-row log: (kind << 32) | slot (uint64, GHNSW_DIRTY_* kinds) of the slots changed since the
 * last drain, ascending; clears them.  Returns (log, the drain's number). */
static PyObject *Core_drain_dirty(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    outs_t o = {{0}, 0};
    uint64_t drain = 0;
    CALL_NOGIL(st, ghnsw_drain_dirty(IX(self), alloc_bytes, &o, &drain, &err));
    PyObject *log = one_out(st, &err, &o);
    if (!log) return NULL;
    return Py_BuildValue("(NK)", log, (unsigned long long)drain);
}

/* ghnsw_pin_labels: waits without the GIL (a relabelling add may hold the lock meanwhile). */
static PyObject *Core_pin_labels(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    int taken;
    Py_BEGIN_ALLOW_THREADS
    taken = ghnsw_pin_labels(IX(self));
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(taken);
}

static PyObject *Core_unpin_labels(CoreObject *self, PyObject *args) {
    int taken;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "p", &taken)) return NULL;
    ghnsw_unpin_labels(IX(self), taken);
    Py_RETURN_NONE;
}

/* Copy rows of the given slots into caller buffers (the GPU sync's staging gather: the stored rows
 * decoded; with exact, the exact rows where the index keeps them). */
static PyObject *Core_gather_rows(CoreObject *self, PyObject *args) {
    Py_buffer sl, vo, lo, dgo, lbo, lvo;
    int exact = 0;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*w*w*w*w*w*|p", &sl, &vo, &lo, &dgo, &lbo, &lvo, &exact)) return NULL;
    ghnsw_index_t *ix = IX(self);
    size_t n = (size_t)sl.len / 4;
    PyObject *ret = NULL;
    if (!(check_len(&vo, n * ix->dim_pad * 4, "vectors out") || check_len(&lo, n * ix->M0 * 4, "links out") ||
          check_len(&dgo, n * 4, "degree out") || check_len(&lbo, n * 8, "labels out") ||
          check_len(&lvo, n, "levels out"))) {
        ghnsw_err_t err = {{0}};
        ghnsw_status_t st;
        CALL_NOGIL(st, ghnsw_gather_rows(ix, sl.buf, n, vo.buf, lo.buf, dgo.buf, lbo.buf, lvo.buf, exact, &err));
        ret = st ? raise_status(st, &err, PyExc_RuntimeError) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&sl); PyBuffer_Release(&vo); PyBuffer_Release(&lo);
    PyBuffer_Release(&dgo); PyBuffer_Release(&lbo); PyBuffer_Release(&lvo);
    return ret;
}

/* Level-0 lists and degrees alone of the given slots (the GPU sync's rows whose links alone changed). */
static PyObject *Core_gather_links(CoreObject *self, PyObject *args) {
    Py_buffer sl, lo, dgo;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*w*w*", &sl, &lo, &dgo)) return NULL;
    ghnsw_index_t *ix = IX(self);
    size_t n = (size_t)sl.len / 4;
    PyObject *ret = NULL;
    if (!(check_len(&lo, n * ix->M0 * 4, "links out") || check_len(&dgo, n * 4, "degree out"))) {
        ghnsw_err_t err = {{0}};
        ghnsw_status_t st;
        CALL_NOGIL(st, ghnsw_gather_rows(ix, sl.buf, n, NULL, lo.buf, dgo.buf, NULL, NULL, 0, &err));
        ret = st ? raise_status(st, &err, PyExc_RuntimeError) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&sl); PyBuffer_Release(&lo); PyBuffer_Release(&dgo);
    return ret;
}

/* Distances of queries to slots as a search scores them (stored rows): distances(q f32[nq,dim],
 * slots u32[nq,c], out f32[nq,c]). */
static PyObject *Core_distances(CoreObject *self, PyObject *args) {
    Py_buffer q, sl, out;
    Py_ssize_t nq;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*ny*w*", &q, &nq, &sl, &out)) return NULL;
    ghnsw_index_t *ix = IX(self);
    PyObject *ret = NULL;
    size_t c = nq > 0 ? (size_t)sl.len / 4 / (size_t)nq : 0;
    if (nq >= 0 && !check_len(&q, (size_t)nq * ix->dim * 4, "queries") && !check_len(&sl, (size_t)nq * c * 4, "slots") &&
        !check_len(&out, (size_t)nq * c * 4, "out")) {
        ghnsw_err_t err = {{0}};
        ghnsw_status_t st;
        CALL_NOGIL(st, ghnsw_distances(ix, q.buf, (size_t)nq, sl.buf, c, out.buf, &err));
        ret = st ? raise_status(st, &err, PyExc_RuntimeError) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&q); PyBuffer_Release(&sl); PyBuffer_Release(&out);
    return ret;
}

/* Distances of stored slot pairs as insertion scores them: pair_distances(a u32[n], b u32[n], out f32[n]). */
static PyObject *Core_pair_distances(CoreObject *self, PyObject *args) {
    Py_buffer a, b, out;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*y*w*", &a, &b, &out)) return NULL;
    PyObject *ret = NULL;
    size_t n = (size_t)a.len / 4;
    if (!check_len(&b, n * 4, "b") && !check_len(&out, n * 4, "out")) {
        ghnsw_err_t err = {{0}};
        ghnsw_status_t st;
        CALL_NOGIL(st, ghnsw_pair_distances(IX(self), a.buf, b.buf, n, out.buf, &err));
        ret = st ? raise_status(st, &err, PyExc_RuntimeError) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&a); PyBuffer_Release(&b); PyBuffer_Release(&out);
    return ret;
}

/* Upper-level blocks of the given slots (levels[s] * (1 + M) uint32 each, concatenated in the given
 * order), each copied under its slot lock: the GPU sync's upper-level gather. */
static PyObject *Core_gather_upper(CoreObject *self, PyObject *args) {
    Py_buffer sl;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*", &sl)) return NULL;
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    outs_t o = {{0}, 0};
    CALL_NOGIL(st, ghnsw_gather_upper(IX(self), sl.buf, (size_t)sl.len / 4, alloc_bytes, &o, &err));
    PyBuffer_Release(&sl);
    return one_out(st, &err, &o);
}

static PyObject *Core_deleted_bitset(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    outs_t o = {{0}, 0};
    CALL_NOGIL(st, ghnsw_deleted_bitset(IX(self), alloc_bytes, &o, &err));
    return one_out(st, &err, &o);
}

/* export_state(decoded=False) -> dict (docs/architecture.md, "State export / import"); with decoded,
 * vectors are float32 [count, dim] whatever the storage (the exact rows with rerank, else decoded) and
 * the dict describes a float32 index (hnswlib's format). */
static PyObject *Core_export_state(CoreObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"decoded", NULL};
    int decoded = 0;
    NEED_IX(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|p", kwlist, &decoded)) return NULL;
    ghnsw_index_t *ix = IX(self);
    ghnsw_export_t ex;
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    outs_t o = {{0}, 0};
    CALL_NOGIL(st, ghnsw_export(ix, decoded, &ex, alloc_bytes, &o, &err));
    if (st) { outs_clear(&o); return raise_status(st, &err, PyExc_RuntimeError); }
    PyObject *d = Py_BuildValue(
        "{s:s,s:I,s:I,s:I,s:K,s:O,s:I,s:I,s:L,s:i,s:K,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:s,s:O,s:O,s:O,s:K,s:K}",
        "space", SPACES[ix->space], "dim", ix->dim, "M", ix->M, "ef_construction", ix->ef_construction,
        "random_seed", (unsigned long long)ix->seed, "allow_replace_deleted", ix->allow_replace_deleted ? Py_True : Py_False,
        "max_elements", ex.capacity, "count", ex.count, "entry_point", (long long)ex.entry_point, "max_level",
        ex.max_level, "insert_seq", (unsigned long long)ex.insert_seq, "vectors", o.objs[0], "links0", o.objs[1],
        "degree0", o.objs[2], "labels", o.objs[3], "levels", o.objs[4], "upper", o.objs[5], "deleted", o.objs[6],
        "storage", decoded ? "float32" : STORAGES[ix->storage], "rerank", !decoded && ix->rerank ? Py_True : Py_False,
        "exact", o.objs[7], "quantizer", o.objs[8],
        "clipped_rows", decoded ? 0ULL : (unsigned long long)ex.clipped_rows,
        "clipped_values", decoded ? 0ULL : (unsigned long long)ex.clipped_values);
    outs_clear(&o);
    return d;
}

static int state_buffer(PyObject *d, const char *key, Py_buffer *b) {
    PyObject *o = PyDict_GetItemString(d, key);
    if (!o) { PyErr_Format(PyExc_ValueError, "state: missing '%s'", key); return -1; }
    return PyObject_GetBuffer(o, b, PyBUF_SIMPLE);
}

/* An integer field of the state in [lo, hi] (lo >= -1; -1 comes back as ULLONG_MAX); anything
 * else is a ValueError naming the field. */
static int state_int(PyObject *d, const char *key, long long lo, unsigned long long hi, unsigned long long *out) {
    PyObject *o = PyDict_GetItemString(d, key);
    if (!o) { PyErr_Format(PyExc_ValueError, "state: missing '%s'", key); return -1; }
    int overflow = 0, ok = PyLong_Check(o);
    long long v = ok ? PyLong_AsLongLongAndOverflow(o, &overflow) : 0;
    if (ok && !PyErr_Occurred()) {
        if (overflow > 0) {
            *out = PyLong_AsUnsignedLongLong(o);
            ok = !PyErr_Occurred() && *out <= hi;
        } else {
            *out = (unsigned long long)v;
            ok = !overflow && v >= lo && (v < 0 || (unsigned long long)v <= hi);
        }
    }
    if (ok) return 0;
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "state: '%s' must be an integer in [%lld, %llu]", key, lo, hi);
    return -1;
}

/* An optional str field of the state: its position in `names`, `dflt` where absent; -1 (ValueError set)
 * where it names none of them. */
static int state_choice(PyObject *d, const char *key, const char **names, int n, int dflt) {
    PyObject *o = PyDict_GetItemString(d, key);
    if (!o) return dflt;
    const char *v = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    for (int i = 0; v && i < n; i++) if (!strcmp(v, names[i])) return i;
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "state: bad '%s'", key);
    return -1;
}

/* An optional bool field of the state (absent: false); -1 with ValueError where not a bool. */
static int state_flag(PyObject *d, const char *key) {
    PyObject *o = PyDict_GetItemString(d, key);
    if (!o) return 0;
    if (!PyBool_Check(o)) { PyErr_Format(PyExc_ValueError, "state: '%s' must be a bool", key); return -1; }
    return o == Py_True;
}

/* Core.from_state(dict, fd=-1, vectors_offset=0, links0_offset=0, exact_offset=0, storage=None,
 * rerank=None): a new Core filled from the state layout, everything validated.  With fd, vectors and
 * links0 (and exact, with rerank) are mapped from that file at those offsets (ghnsw_map_rows) and the
 * dict's are not read.  storage / rerank: the state's (its 'storage', 'rerank'), or another storage
 * for the float32 rows of a float32 state without exact rows, encoded as they come in. */
static PyObject *Core_from_state(PyObject *cls, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"state", "fd", "vectors_offset", "links0_offset", "exact_offset", "storage", "rerank",
                             NULL};
    PyObject *d, *want_storage = Py_None, *want_rerank = Py_None;
    int fd = -1;
    unsigned long long voff = 0, loff = 0, xoff = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|iKKKOO", kwlist, &d, &fd, &voff, &loff, &xoff, &want_storage,
                                     &want_rerank))
        return NULL;
    if (!PyDict_Check(d)) { PyErr_SetString(PyExc_TypeError, "state must be a dict"); return NULL; }
    unsigned long long dim, M, efc, seed, cap, count, ep, maxl, seq, allow, clipped_rows = 0, clipped_values = 0;
    PyObject *space = PyDict_GetItemString(d, "space");
    if (!space || !PyUnicode_Check(space)) { PyErr_SetString(PyExc_ValueError, "state: bad 'space'"); return NULL; }
    if (state_int(d, "dim", 1, GHNSW_MAX_DIM, &dim) || state_int(d, "M", 2, GHNSW_MAX_M, &M) ||
        state_int(d, "ef_construction", 0, GHNSW_MAX_EF_CONSTRUCTION, &efc) ||
        state_int(d, "random_seed", 0, UINT64_MAX, &seed) || state_int(d, "max_elements", 0, GHNSW_MAX_CAPACITY, &cap) ||
        state_int(d, "count", 0, cap, &count) || state_int(d, "entry_point", -1, count, &ep) ||
        state_int(d, "max_level", -1, GHNSW_MAX_LEVEL, &maxl) || state_int(d, "insert_seq", 0, UINT64_MAX, &seq) ||
        state_int(d, "allow_replace_deleted", 0, 1, &allow) ||
        (PyDict_GetItemString(d, "clipped_rows") && state_int(d, "clipped_rows", 0, UINT64_MAX, &clipped_rows)) ||
        (PyDict_GetItemString(d, "clipped_values") && state_int(d, "clipped_values", 0, UINT64_MAX, &clipped_values)))
        return NULL;
    int storage = state_choice(d, "storage", STORAGES, GHNSW_N_STORAGES, GHNSW_F32), rerank = state_flag(d, "rerank");
    if (storage < 0 || rerank < 0) return NULL;
    int target = storage, target_rerank = rerank;
    if (want_storage != Py_None) {
        target = PyUnicode_Check(want_storage) ? parse_storage(PyUnicode_AsUTF8(want_storage)) : -1;
        if (target < 0) { PyErr_Clear(); PyErr_SetString(PyExc_ValueError, "storage must be one of float32, float16, or int8"); return NULL; }
    }
    if (want_rerank != Py_None) target_rerank = PyObject_IsTrue(want_rerank);
    /* another storage or re-rank setting only for plain float32 rows: they are encoded as they come in */
    int convert = target != storage || target_rerank != rerank;
    if (convert && (storage != GHNSW_F32 || rerank)) {
        PyErr_Format(PyExc_ValueError, "the state holds %s rows%s: they load as they are (storage='%s', rerank=%s)",
                     STORAGES[storage], rerank ? " with exact rows" : "", STORAGES[storage], rerank ? "True" : "False");
        return NULL;
    }
    int mapped = fd >= 0;
    if (mapped && convert) { PyErr_SetString(PyExc_ValueError, "mapped rows cannot be converted to another storage"); return NULL; }
    /* a mapped Core starts with capacity 0, so that no row is allocated before the mapping */
    PyObject *cargs = Py_BuildValue("(OKKKKK)", space, dim, mapped ? 0ULL : cap, M, efc, seed);
    PyObject *kw = Py_BuildValue("{s:O,s:s,s:O}", "allow_replace_deleted", allow ? Py_True : Py_False, "storage",
                                 STORAGES[target], "rerank", target_rerank ? Py_True : Py_False);
    CoreObject *self = cargs && kw ? (CoreObject *)PyObject_Call(cls, cargs, kw) : NULL;
    Py_XDECREF(cargs); Py_XDECREF(kw);
    if (!self) return NULL;
    enum { NB = 9 };
    Py_buffer b[NB] = {{0}};
    const char *keys[NB] = {"vectors", "links0", "degree0", "labels", "levels", "upper", "deleted", "exact", "quantizer"};
    int got = 0, ok = 1;
    for (; got < NB && ok; got++) {
        if (mapped && (got < 2 || got == 7)) continue; /* vectors, links0, exact: from the mapping */
        if (got >= 7 && !PyDict_GetItemString(d, keys[got])) continue; /* optional */
        ok = state_buffer(d, keys[got], &b[got]) == 0;
    }
    ghnsw_status_t st = GHNSW_OK;
    ghnsw_err_t err = {{0}};
    if (ok) {
        ghnsw_state_t in = {(uint32_t)count, (int64_t)ep, (int)(long long)maxl, (uint64_t)seq,
                            b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[5].buf, b[4].buf, b[6].buf,
                            (size_t)b[0].len, (size_t)b[1].len, (size_t)b[2].len, (size_t)b[3].len,
                            (size_t)b[4].len, (size_t)b[5].len, (size_t)b[6].len,
                            convert, b[7].len ? b[7].buf : NULL, b[8].len ? b[8].buf : NULL,
                            (size_t)b[7].len, (size_t)b[8].len, clipped_rows, clipped_values};
        Py_BEGIN_ALLOW_THREADS
        if (mapped) st = ghnsw_map_rows(self->ix, (uint32_t)cap, fd, voff, loff, xoff, (uint32_t)count, &err);
        if (!st) st = ghnsw_import(self->ix, &in, &err);
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < NB; i++) if (b[i].obj) PyBuffer_Release(&b[i]); /* a skipped one is zeroed */
    if (!ok || st) {
        Py_DECREF(self);
        return !ok ? NULL : raise_status(st, &err, PyExc_ValueError);
    }
    return (PyObject *)self;
}

static long long entry_point_of(ghnsw_index_t *ix) {
    uint32_t ep = __atomic_load_n(&ix->entry_point, __ATOMIC_ACQUIRE);
    return ep == GHNSW_INVALID ? -1LL : (long long)ep;
}

static size_t nogil_size(size_t (*fn)(ghnsw_index_t *), ghnsw_index_t *ix) {
    size_t v;
    Py_BEGIN_ALLOW_THREADS
    v = fn(ix);
    Py_END_ALLOW_THREADS
    return v;
}

#define GETTER(name, expr) \
    static PyObject *Core_get_##name(CoreObject *self, void *c) { NEED_IX(self); ghnsw_index_t *ix = self->ix; return expr; }
GETTER(space, PyUnicode_FromString(SPACES[ix->space]))
GETTER(dim, PyLong_FromUnsignedLong(ix->dim))
GETTER(dim_pad, PyLong_FromUnsignedLong(ix->dim_pad))
GETTER(M, PyLong_FromUnsignedLong(ix->M))
GETTER(M0, PyLong_FromUnsignedLong(ix->M0))
GETTER(ef_construction, PyLong_FromUnsignedLong(ix->ef_construction))
GETTER(max_elements, PyLong_FromUnsignedLong(__atomic_load_n(&ix->capacity, __ATOMIC_RELAXED)))
GETTER(count, PyLong_FromUnsignedLong(__atomic_load_n(&ix->count, __ATOMIC_ACQUIRE)))
GETTER(n_deleted, PyLong_FromUnsignedLong(__atomic_load_n(&ix->n_deleted, __ATOMIC_RELAXED)))
GETTER(entry_point, PyLong_FromLongLong(entry_point_of(ix)))
GETTER(max_level, PyLong_FromLong(__atomic_load_n(&ix->max_level, __ATOMIC_RELAXED)))
GETTER(random_seed, PyLong_FromUnsignedLongLong(ix->seed))
GETTER(allow_replace_deleted, PyBool_FromLong(ix->allow_replace_deleted))
GETTER(insert_seq, PyLong_FromUnsignedLongLong(__atomic_load_n(&ix->insert_seq, __ATOMIC_RELAXED)))
GETTER(relabels, PyLong_FromUnsignedLongLong(__atomic_load_n(&ix->relabels, __ATOMIC_ACQUIRE)))
GETTER(memory_bytes, PyLong_FromSize_t(nogil_size(ghnsw_memory_bytes, ix)))
GETTER(count_dirty, PyLong_FromSize_t(nogil_size(ghnsw_count_dirty, ix)))
GETTER(mapped, PyBool_FromLong(__atomic_load_n(&ix->vectors_map_len, __ATOMIC_RELAXED) != 0 ||
                               __atomic_load_n(&ix->links0_map_len, __ATOMIC_RELAXED) != 0 ||
                               __atomic_load_n(&ix->exact_map_len, __ATOMIC_RELAXED) != 0))
GETTER(storage, PyUnicode_FromString(STORAGES[ix->storage]))
GETTER(rerank, PyBool_FromLong(ix->rerank))
GETTER(clipped_rows, PyLong_FromUnsignedLongLong(__atomic_load_n(&ix->clipped_rows, __ATOMIC_RELAXED)))
GETTER(clipped_values, PyLong_FromUnsignedLongLong(__atomic_load_n(&ix->clipped_values, __ATOMIC_RELAXED)))

#define G(name, doc) {#name, (getter)Core_get_##name, NULL, doc, NULL}
static PyGetSetDef Core_getset[] = {
    G(space, "'l2', 'ip' or 'cosine'"), G(dim, "vector width"), G(dim_pad, "row width in floats (multiple of 4)"),
    G(M, "links per node on upper levels"), G(M0, "links per node on level 0 (2M)"),
    G(ef_construction, "beam width while inserting"), G(max_elements, "capacity in slots"),
    G(count, "slots in use, deleted included"), G(n_deleted, "slots marked deleted"),
    G(entry_point, "entry slot, -1 when empty"), G(max_level, "top level, -1 when empty"),
    G(random_seed, "level generator seed"), G(allow_replace_deleted, "replace_deleted enabled"),
    G(insert_seq, "rows ever added (level generator counter)"), G(memory_bytes, "bytes held by the index"),
    G(count_dirty, "slots in the dirty-row log"),
    G(mapped, "vectors, links0 or exact rows are still mapped from the file of a mapped load"),
    G(relabels, "adds that moved a slot to another label; label bitsets made before it changed are stale"),
    G(storage, "'float32', 'float16' or 'int8': how rows are stored"),
    G(rerank, "float32 rows kept beside the stored ones; the final candidates are re-scored with them"),
    G(clipped_rows, "int8: rows stored with values outside the ranges (clipped)"),
    G(clipped_values, "int8: values clipped to the ranges"),
    {NULL}};

static PyMethodDef Core_methods[] = {
    {"add", (PyCFunction)Core_add, METH_VARARGS,
     "add(data f32[n,dim], labels u64[n], n, num_threads, replace_deleted[, graph_cands u32[n,cg], batch_cands u32[n,cb]]) "
     "-> rows stored with values clipped to the int8 ranges (an untrained int8 core takes its ranges from these rows)"},
    {"train", (PyCFunction)Core_train, METH_VARARGS,
     "train(low f32[dim], high f32[dim][, integral u8[dim]]): int8 ranges, before the first row is stored; "
     "integral: the dimension's values are integers (a span <= 255 is then stored exactly)"},
    {"quantizer", (PyCFunction)Core_quantizer, METH_NOARGS,
     "quantizer() -> bytes f32[2, dim] (offsets, then scales: x ~ offset + scale * code), or None while untrained"},
    {"search", (PyCFunction)(void (*)(void))Core_search, METH_VARARGS | METH_KEYWORDS,
     "search(queries f32[nq,dim], out_labels u64[nq,k], out_dists f32[nq,k], out_found i32[nq], *, k, beam, "
     "num_threads=0, allowed=None, allowed_stride=0, filter=None, slots=False): the k nearest with a beam of "
     "beam >= k (max(ef, k)); allowed: u32 bitset over slots, or [nq, allowed_stride] (one row per query); "
     "filter: callable(label) -> bool; slots: slot ids instead of labels"},
    {"allowed_bitset", (PyCFunction)Core_allowed_bitset, METH_VARARGS, "allowed_bitset(labels u64[n]) -> bytes u32[ceil(cap/32)]"},
    {"mark_deleted", (PyCFunction)Core_mark_deleted, METH_VARARGS, "mark_deleted(label)"},
    {"unmark_deleted", (PyCFunction)Core_unmark_deleted, METH_VARARGS, "unmark_deleted(label)"},
    {"resize", (PyCFunction)Core_resize, METH_VARARGS, "resize(max_elements)"},
    {"lookup", (PyCFunction)Core_lookup, METH_VARARGS, "lookup(label) -> (slot or -1, deleted)"},
    {"get_vectors", (PyCFunction)Core_get_vectors, METH_VARARGS, "get_vectors(labels u64[n], out f32[n,dim])"},
    {"labels", (PyCFunction)Core_labels, METH_NOARGS, "labels() -> bytes u64[count], slot order"},
    {"neighbors", (PyCFunction)Core_neighbors, METH_VARARGS, "neighbors(label, level) -> bytes u64[deg]"},
    {"levels_of", (PyCFunction)Core_levels_of, METH_VARARGS, "levels_of(labels u64[n], out u8[n])"},
    {"check_integrity", (PyCFunction)Core_check_integrity, METH_NOARGS, "check_integrity() -> dict"},
    {"build_search_graph", (PyCFunction)Core_build_search_graph, METH_VARARGS,
     "build_search_graph(degree, threads, with_labels=False, with_forward=False) -> bytes u32[count, degree]: "
     "level 0 with its reverse edges (search_graph.c); with_labels / with_forward: a tuple (graph, [labels "
     "u64[count], live u8[count]], [forward counts u32[count]]), one snapshot"},
    {"update_search_graph", (PyCFunction)Core_update_search_graph, METH_VARARGS,
     "update_search_graph(rows u32[n, degree], fdeg u32[n], slots u32[m], renew u8[m], threads) -> bytes u32[]: the rows "
     "of the ascending slots whose level-0 lists changed brought in step, in place; the rows written"},
    {"sync_pending", (PyCFunction)Core_sync_pending, METH_O,
     "sync_pending(drain) -> bool: something to sync for a mirror whose last drain was number `drain` (O(1))"},
    {"drain_dirty", (PyCFunction)Core_drain_dirty, METH_NOARGS, "drain_dirty() -> (bytes u64[r]: (kind << 32) | slot, ascending; drain number: 1, 2, ...)"},
    {"pin_labels", (PyCFunction)Core_pin_labels, METH_NOARGS,
     "pin_labels() -> taken: relabels (replace_deleted) wait until unpin_labels(taken), so label bitsets "
     "made meanwhile stay right over several calls; False (nothing held) inside a filter callback on this core"},
    {"unpin_labels", (PyCFunction)Core_unpin_labels, METH_VARARGS, "unpin_labels(taken): ends pin_labels"},
    {"gather_rows", (PyCFunction)Core_gather_rows, METH_VARARGS,
     "gather_rows(slots u32[r], vectors f32[r,dim_pad], links u32[r,M0], degree u32[r], labels u64[r], levels u8[r]"
     "[, exact]): vectors are the stored rows decoded, or with exact the exact rows where kept"},
    {"gather_links", (PyCFunction)Core_gather_links, METH_VARARGS, "gather_links(slots u32[r], links u32[r,M0], degree u32[r])"},
    {"distances", (PyCFunction)Core_distances, METH_VARARGS,
     "distances(q f32[nq,dim], nq, slots u32[nq,c], out f32[nq,c]): query-to-slot distances as a search scores them"},
    {"pair_distances", (PyCFunction)Core_pair_distances, METH_VARARGS,
     "pair_distances(a u32[n], b u32[n], out f32[n]): slot-to-slot distances as insertion scores them"},
    {"gather_upper", (PyCFunction)Core_gather_upper, METH_VARARGS,
     "gather_upper(slots u32[r]) -> bytes: each slot's levels[s]*(1+M) uint32 upper block, concatenated"},
    {"deleted_bitset", (PyCFunction)Core_deleted_bitset, METH_NOARGS, "deleted_bitset() -> bytes u32[ceil(cap/32)]"},
    {"export_state", (PyCFunction)(void (*)(void))Core_export_state, METH_VARARGS | METH_KEYWORDS,
     "export_state(decoded=False) -> dict; decoded: float32 [count, dim] vectors whatever the storage"},
    {"from_state", (PyCFunction)(void (*)(void))Core_from_state, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "from_state(dict, fd=-1, vectors_offset=0, links0_offset=0, exact_offset=0, storage=None, rerank=None) -> Core; "
     "with fd, vectors [count, row_bytes], links0 [count, M0] (and exact [count, dim_pad]) are mapped copy-on-write "
     "from that file at those offsets; storage/rerank other than the state's encode a float32 state's rows"},
    {NULL}};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gpuhnsw._core.Core",
    .tp_basicsize = sizeof(CoreObject),
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "HNSW index storage, insertion and search (C core of gpuhnsw.Index).",
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
    .tp_init = (initproc)Core_init,
    .tp_new = PyType_GenericNew,
};

static PyObject *mod_level_for(PyObject *m, PyObject *args) {
    unsigned long long seed, seq;
    double mult;
    if (!PyArg_ParseTuple(args, "KKd", &seed, &seq, &mult)) return NULL;
    return PyLong_FromLong(ghnsw_level_for(seed, seq, mult));
}

/* NN-descent's per-round callback: the Python callable gets (round, updates); an exception stops the run. */
static int call_on_round(void *ctx, uint32_t round, uint64_t updates) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *res = PyObject_CallFunction((PyObject *)ctx, "IK", round, (unsigned long long)updates);
    Py_XDECREF(res);
    PyGILState_Release(g);
    return res ? 0 : -1;
}

static PyObject *mod_nndescent(PyObject *m, PyObject *args) {
    Py_buffer data, oi, od;
    Py_ssize_t n, dim;
    const char *space;
    ghnsw_nnd_params_t p = {0};
    unsigned long long seed;
    PyObject *cb;
    const char *storage = "float32";
    if (!PyArg_ParseTuple(args, "y*nnsIIIIIdKiw*w*O|s", &data, &n, &dim, &space, &p.k, &p.max_candidates, &p.n_trees,
                          &p.leaf_size, &p.n_iters, &p.delta, &seed, &p.num_threads, &oi, &od, &cb, &storage))
        return NULL;
    PyObject *ret = NULL;
    int sp = parse_space(space);
    p.storage = parse_storage(storage);
    if (sp < 0) { PyErr_Format(PyExc_ValueError, "unknown space '%s'", space); goto out; }
    if (p.storage < 0) { PyErr_Format(PyExc_ValueError, "unknown storage '%s'", storage); goto out; }
    if (n < 0 || dim < 0 || check_len(&data, (size_t)n * dim * 4, "data") ||
        check_len(&oi, (size_t)n * p.k * 8, "ids out") || check_len(&od, (size_t)n * p.k * 4, "distances out"))
        goto out;
    p.seed = seed;
    if (cb != Py_None) { p.on_round = call_on_round; p.on_round_ctx = cb; }
    ghnsw_nnd_info_t info = {0};
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    Py_BEGIN_ALLOW_THREADS
    st = ghnsw_nndescent(data.buf, (size_t)n, (size_t)dim, sp, &p, oi.buf, od.buf, &info, &err);
    Py_END_ALLOW_THREADS
    if (st) raise_status(st, &err, PyExc_RuntimeError);
    else ret = Py_BuildValue("IKK", info.rounds, (unsigned long long)info.dist_evals, (unsigned long long)info.last_updates);
out:
    PyBuffer_Release(&data); PyBuffer_Release(&oi); PyBuffer_Release(&od);
    return ret;
}

static PyObject *mod_row_bytes(PyObject *m, PyObject *args) {
    unsigned long long dim;
    const char *storage;
    if (!PyArg_ParseTuple(args, "Ks", &dim, &storage)) return NULL;
    int sto = parse_storage(storage);
    if (sto < 0 || dim > GHNSW_MAX_DIM) { PyErr_SetString(PyExc_ValueError, "bad dim or storage"); return NULL; }
    return PyLong_FromSize_t(ghnsw_row_bytes((uint32_t)dim, sto));
}

static PyMethodDef module_methods[] = {
    {"row_bytes", mod_row_bytes, METH_VARARGS, "row_bytes(dim, storage) -> bytes of one stored row"},
    {"level_for", mod_level_for, METH_VARARGS, "level_for(seed, seq, mult) -> level of the seq-th row"},
    {"nndescent", mod_nndescent, METH_VARARGS,
     "nndescent(data f32[n,dim], n, dim, space, k, max_candidates, n_trees, leaf_size, n_iters, delta, seed, "
     "threads, out_ids i64[n,k], out_dists f32[n,k], on_round[, storage: the joins over a float16 or int8 copy]) "
     "-> (rounds, dist_evals, last_updates)"},
    {NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "gpuhnsw._core", "gpuhnsw C core", -1, module_methods};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) { Py_DECREF(&CoreType); Py_DECREF(m); return NULL; }
    PyModule_AddStringConstant(m, "simd", ghnsw_simd_name());
    PyModule_AddIntConstant(m, "default_threads", ghnsw_default_threads());
    /* the one home of each limit and sentinel; the Python modules read them from here */
    PyModule_AddIntConstant(m, "MAX_CAPACITY", GHNSW_MAX_CAPACITY);
    PyModule_AddIntConstant(m, "MAX_M", GHNSW_MAX_M);
    PyModule_AddIntConstant(m, "MAX_DIM", GHNSW_MAX_DIM);
    PyModule_AddIntConstant(m, "MAX_EF_CONSTRUCTION", GHNSW_MAX_EF_CONSTRUCTION);
    PyModule_AddIntConstant(m, "MAX_LEVEL", GHNSW_MAX_LEVEL);
    PyModule_AddIntConstant(m, "MAX_GRAPH_DEGREE", GHNSW_MAX_GRAPH_DEGREE);
    PyModule_AddIntConstant(m, "DIRTY_ROW", GHNSW_DIRTY_ROW);
    PyModule_AddIntConstant(m, "DIRTY_LINKS", GHNSW_DIRTY_LINKS);
    PyModule_AddIntConstant(m, "DIRTY_APPEND", GHNSW_DIRTY_APPEND);
    PyModule_AddIntConstant(m, "DIRTY_UPPER", GHNSW_DIRTY_UPPER);
    PyModule_AddIntConstant(m, "DIRTY_DELETED", GHNSW_DIRTY_DELETED);
    PyModule_AddObject(m, "INVALID_SLOT", PyLong_FromUnsignedLong(GHNSW_INVALID));
    PyModule_AddObject(m, "NO_LABEL", PyLong_FromUnsignedLongLong(GHNSW_NO_LABEL));
    PyModule_AddObject(m, "SPACES", Py_BuildValue("(sss)", SPACES[0], SPACES[1], SPACES[2]));
    PyModule_AddObject(m, "STORAGES", Py_BuildValue("(sss)", STORAGES[0], STORAGES[1], STORAGES[2]));
    return m;
}
