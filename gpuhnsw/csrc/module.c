/* gpuhnsw._core: the Python type `Core` over ghnsw_index_t.  Plain CPython API, no numpy headers:
 * arrays come in as C-contiguous buffers (the Python layer checks dtype and shape; this file checks
 * byte lengths), outputs are buffers allocated by the caller.  The GIL is released around every call
 * that touches many rows. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

typedef struct {
    PyObject_HEAD
    ghnsw_index_t *ix;
} CoreObject;

static PyTypeObject CoreType;
static const char *SPACES[] = {"l2", "ip", "cosine"};

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

static int Core_init(CoreObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"space", "dim", "max_elements", "M", "ef_construction", "random_seed",
                             "allow_replace_deleted", NULL};
    const char *space;
    unsigned long long dim, cap, M, efc, seed;
    int allow = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sKKKKK|p", kwlist, &space, &dim, &cap, &M, &efc, &seed, &allow))
        return -1;
    int sp = parse_space(space);
    if (sp < 0) { PyErr_SetString(PyExc_ValueError, "space must be one of l2, ip, or cosine"); return -1; }
    if (dim > (1u << 24) || M > 10000 || efc > (1u << 24) || cap > GHNSW_MAX_CAPACITY) {
        PyErr_SetString(PyExc_ValueError, "parameter out of range");
        return -1;
    }
    if (self->ix) { ghnsw_free(self->ix); self->ix = NULL; }
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    Py_BEGIN_ALLOW_THREADS
    st = ghnsw_create(&self->ix, sp, (uint32_t)dim, (uint32_t)cap, (uint32_t)M, (uint32_t)efc, seed, allow, &err);
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
    Py_BEGIN_ALLOW_THREADS
    st = ghnsw_add(IX(self), data.buf, labels.buf, (size_t)n, threads, replace, cp, &err);
    Py_END_ALLOW_THREADS
    if (st) raise_status(st, &err, PyExc_RuntimeError);
    else ret = Py_NewRef(Py_None);
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

static PyObject *Core_search(CoreObject *self, PyObject *args) {
    Py_buffer q, ol, od, of, bits = {0};
    Py_ssize_t nq;
    unsigned int k, ef;
    int threads;
    PyObject *bits_obj, *callback;
    int want_slots = 0;
    Py_ssize_t stride = 0;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*nIIiw*w*w*OO|pn", &q, &nq, &k, &ef, &threads, &ol, &od, &of, &bits_obj, &callback,
                          &want_slots, &stride))
        return NULL;
    PyObject *ret = NULL;
    ghnsw_index_t *ix = IX(self);
    int have_bits = 0;
    ghnsw_filter_t filter = {NULL, 0, NULL, NULL};
    pyfilter_t pf = {NULL, NULL, NULL, NULL};
    if (nq < 0 || check_len(&q, (size_t)nq * ix->dim * 4, "queries") || check_len(&ol, (size_t)nq * k * 8, "labels out") ||
        check_len(&od, (size_t)nq * k * 4, "distances out") || check_len(&of, (size_t)nq * 4, "found out"))
        goto out;
    if (bits_obj != Py_None) {
        if (PyObject_GetBuffer(bits_obj, &bits, PyBUF_SIMPLE) < 0) goto out;
        have_bits = 1;
        size_t words = ((size_t)ix->capacity + 31) / 32;
        if (stride < 0 || (stride > 0 && (size_t)stride < words) ||
            (size_t)bits.len < (stride ? (size_t)nq * (size_t)stride : words) * 4) {
            PyErr_SetString(PyExc_ValueError, "filter bitset is shorter than the index");
            goto out;
        }
        filter.allowed_bits = bits.buf;
        filter.words_per_query = (size_t)stride;
    }
    if (callback != Py_None) {
        pf.fn = callback;
        filter.callback = call_filter;
        filter.callback_ctx = &pf;
    }
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    const ghnsw_filter_t *fp = (have_bits || pf.fn) ? &filter : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = ghnsw_search(ix, q.buf, (size_t)nq, k, ef, threads, fp, want_slots, ol.buf, od.buf, of.buf, &err);
    Py_END_ALLOW_THREADS
    if (pf.exc_type) PyErr_Restore(pf.exc_type, pf.exc_value, pf.exc_tb);
    else if (st) raise_status(st, &err, PyExc_RuntimeError);
    else ret = Py_NewRef(Py_None);
    if (st == GHNSW_OK && pf.exc_type) ret = NULL;
out:
    if (have_bits) PyBuffer_Release(&bits);
    PyBuffer_Release(&q); PyBuffer_Release(&ol); PyBuffer_Release(&od); PyBuffer_Release(&of);
    return ret;
}

/* labels -> bitset over slots (unknown labels are ignored: they cannot be returned anyway) */
static PyObject *Core_allowed_bitset(CoreObject *self, PyObject *args) {
    Py_buffer lab;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*", &lab)) return NULL;
    ghnsw_index_t *ix = IX(self);
    size_t words = ((size_t)ix->capacity + 31) / 32;
    PyObject *out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(words * 4));
    if (out) {
        uint32_t *bits = (uint32_t *)PyByteArray_AS_STRING(out);
        memset(bits, 0, words * 4);
        const uint64_t *l = lab.buf;
        size_t n = (size_t)lab.len / 8;
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&ix->map_lock);
        for (size_t i = 0; i < n; i++) {
            uint32_t s = ghnsw_map_get(&ix->map, l[i]);
            if (s != GHNSW_INVALID) bits[s >> 5] |= 1u << (s & 31);
        }
        pthread_mutex_unlock(&ix->map_lock);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&lab);
    return out;
}

static PyObject *label_op(CoreObject *self, PyObject *args,
                          ghnsw_status_t (*op)(ghnsw_index_t *, uint64_t, ghnsw_err_t *)) {
    unsigned long long label;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "K", &label)) return NULL;
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    Py_BEGIN_ALLOW_THREADS
    st = op(IX(self), label, &err);
    Py_END_ALLOW_THREADS
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
    ghnsw_index_t *ix = IX(self);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&ix->mut_lock);
    st = ghnsw_resize(ix, (uint32_t)n, &err);
    pthread_mutex_unlock(&ix->mut_lock);
    Py_END_ALLOW_THREADS
    if (st) return raise_status(st, &err, PyExc_RuntimeError);
    Py_RETURN_NONE;
}

/* (slot or -1, deleted) of a label */
static PyObject *Core_lookup(CoreObject *self, PyObject *args) {
    unsigned long long label;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "K", &label)) return NULL;
    uint32_t s = ghnsw_lookup(IX(self), label);
    if (s == GHNSW_INVALID) return Py_BuildValue("(iO)", -1, Py_False);
    return Py_BuildValue("(IO)", s, ghnsw_bit_get(IX(self)->deleted, s) ? Py_True : Py_False);
}

/* Vectors of live labels into out[n, dim]; a missing or deleted label raises "Label not found". */
static PyObject *Core_get_vectors(CoreObject *self, PyObject *args) {
    Py_buffer lab, out;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*w*", &lab, &out)) return NULL;
    ghnsw_index_t *ix = IX(self);
    size_t n = (size_t)lab.len / 8;
    PyObject *ret = NULL;
    if (check_len(&out, n * ix->dim * 4, "out")) goto done;
    int missing = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&ix->resize_lock);
    const uint64_t *l = lab.buf;
    for (size_t i = 0; i < n && !missing; i++) {
        uint32_t s = ghnsw_lookup(ix, l[i]);
        if (s == GHNSW_INVALID || ghnsw_bit_get(ix->deleted, s)) { missing = 1; break; }
        ghnsw_spin_lock(&ix->slot_locks[s]);
        memcpy((float *)out.buf + i * ix->dim, ghnsw_vec(ix, s), ix->dim * 4);
        ghnsw_spin_unlock(&ix->slot_locks[s]);
    }
    pthread_rwlock_unlock(&ix->resize_lock);
    Py_END_ALLOW_THREADS
    if (missing) PyErr_SetString(PyExc_RuntimeError, "Label not found");
    else ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&lab);
    PyBuffer_Release(&out);
    return ret;
}

/* Takes mut_lock with the GIL released: an add_items running in another thread holds mut_lock for
 * its whole batch, and waiting for it with the GIL held would stall every Python thread.  Nothing
 * that holds mut_lock ever waits for the GIL, so taking the GIL back while holding it is safe. */
static void lock_writers(ghnsw_index_t *ix) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&ix->mut_lock);
    Py_END_ALLOW_THREADS
}

/* All labels in slot order (deleted included, as hnswlib's get_ids_list). */
static PyObject *Core_labels(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_index_t *ix = IX(self);
    lock_writers(ix);
    PyObject *b = PyBytes_FromStringAndSize((const char *)ix->labels, (Py_ssize_t)ix->count * 8);
    pthread_mutex_unlock(&ix->mut_lock);
    return b;
}

/* Labels of a label's neighbours on one level. */
static PyObject *Core_neighbors(CoreObject *self, PyObject *args) {
    unsigned long long label;
    int level;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "Ki", &label, &level)) return NULL;
    ghnsw_index_t *ix = IX(self);
    uint32_t s = ghnsw_lookup(ix, label);
    if (s == GHNSW_INVALID) { PyErr_SetString(PyExc_RuntimeError, "Label not found"); return NULL; }
    if (level < 0 || level > ix->levels[s]) {
        PyErr_Format(PyExc_ValueError, "level %d out of range: element %llu has levels 0..%d", level, label, ix->levels[s]);
        return NULL;
    }
    uint32_t *buf = malloc(sizeof(uint32_t) * (ix->M0 + 1));
    uint64_t *lab = malloc(sizeof(uint64_t) * (ix->M0 + 1));
    if (!buf || !lab) { free(buf); free(lab); return PyErr_NoMemory(); }
    pthread_rwlock_rdlock(&ix->resize_lock);
    uint32_t n = ghnsw_read_links(ix, s, level, buf);
    for (uint32_t i = 0; i < n; i++) lab[i] = ix->labels[buf[i]];
    pthread_rwlock_unlock(&ix->resize_lock);
    PyObject *b = PyBytes_FromStringAndSize((const char *)lab, (Py_ssize_t)n * 8);
    free(buf); free(lab);
    return b;
}

static PyObject *Core_levels_of(CoreObject *self, PyObject *args) {
    Py_buffer lab, out;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*w*", &lab, &out)) return NULL;
    ghnsw_index_t *ix = IX(self);
    size_t n = (size_t)lab.len / 8;
    PyObject *ret = NULL;
    if (check_len(&out, n, "out")) goto done;
    const uint64_t *l = lab.buf;
    for (size_t i = 0; i < n; i++) {
        uint32_t s = ghnsw_lookup(ix, l[i]);
        if (s == GHNSW_INVALID) { PyErr_SetString(PyExc_RuntimeError, "Label not found"); goto done; }
        ((uint8_t *)out.buf)[i] = ix->levels[s];
    }
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&lab);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *Core_check_integrity(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_index_t *ix = IX(self);
    ghnsw_integrity_t info;
    ghnsw_err_t err = {{0}};
    ghnsw_status_t st;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&ix->mut_lock);
    st = ghnsw_check_integrity(ix, &info, &err);
    pthread_mutex_unlock(&ix->mut_lock);
    Py_END_ALLOW_THREADS
    if (st) return raise_status(st, &err, PyExc_RuntimeError);
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:i}", "n_live", (Py_ssize_t)info.n_live, "n_deleted",
                         (Py_ssize_t)info.n_deleted, "n_edges", (Py_ssize_t)info.n_edges, "n_unreachable",
                         (Py_ssize_t)info.n_unreachable, "max_level", info.max_level);
}

/* The dirty-row log: ascending slot ids (uint32) changed since the last drain; clears them. */
static PyObject *Core_drain_dirty(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_index_t *ix = IX(self);
    pthread_rwlock_rdlock(&ix->resize_lock);
    size_t cap = ix->capacity;
    uint32_t *buf = malloc(sizeof(uint32_t) * (cap ? cap : 1));
    PyObject *b = NULL;
    if (buf) {
        size_t n = ghnsw_drain_dirty(ix, buf, cap);
        b = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)n * 4);
    }
    pthread_rwlock_unlock(&ix->resize_lock);
    free(buf);
    return b ? b : PyErr_NoMemory();
}

/* Copy rows of the given slots into caller buffers (the GPU sync's staging gather). */
static PyObject *Core_gather_rows(CoreObject *self, PyObject *args) {
    Py_buffer sl, vo, lo, dgo, lbo, lvo;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*w*w*w*w*w*", &sl, &vo, &lo, &dgo, &lbo, &lvo)) return NULL;
    ghnsw_index_t *ix = IX(self);
    size_t n = (size_t)sl.len / 4;
    PyObject *ret = NULL;
    if (check_len(&vo, n * ix->dim_pad * 4, "vectors out") || check_len(&lo, n * ix->M0 * 4, "links out") ||
        check_len(&dgo, n * 4, "degree out") || check_len(&lbo, n * 8, "labels out") || check_len(&lvo, n, "levels out"))
        goto done;
    const uint32_t *slots = sl.buf;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&ix->resize_lock);
    uint32_t count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
    for (size_t i = 0; i < n; i++) {
        uint32_t s = slots[i];
        if (s >= count) { bad = 1; break; }
        ghnsw_spin_lock(&ix->slot_locks[s]);
        memcpy((float *)vo.buf + i * ix->dim_pad, ghnsw_vec(ix, s), ix->dim_pad * 4);
        memcpy((uint32_t *)lo.buf + i * ix->M0, ghnsw_links0(ix, s), ix->M0 * 4);
        ((uint32_t *)dgo.buf)[i] = ix->degree0[s];
        ghnsw_spin_unlock(&ix->slot_locks[s]);
        ((uint64_t *)lbo.buf)[i] = ix->labels[s];
        ((uint8_t *)lvo.buf)[i] = ix->levels[s];
    }
    pthread_rwlock_unlock(&ix->resize_lock);
    Py_END_ALLOW_THREADS
    if (bad) PyErr_SetString(PyExc_ValueError, "slot out of range");
    else ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&sl); PyBuffer_Release(&vo); PyBuffer_Release(&lo);
    PyBuffer_Release(&dgo); PyBuffer_Release(&lbo); PyBuffer_Release(&lvo);
    return ret;
}

/* Upper-level blocks of the given slots (levels[s] * (1 + M) uint32 each, concatenated in the given
 * order), each copied under its slot lock: the GPU sync's upper-level gather. */
static PyObject *Core_gather_upper(CoreObject *self, PyObject *args) {
    Py_buffer sl;
    NEED_IX(self);
    if (!PyArg_ParseTuple(args, "y*", &sl)) return NULL;
    ghnsw_index_t *ix = IX(self);
    const uint32_t *slots = sl.buf;
    size_t n = (size_t)sl.len / 4, words = 0;
    PyObject *out = NULL;
    pthread_rwlock_rdlock(&ix->resize_lock);
    uint32_t count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
    for (size_t i = 0; i < n; i++) {
        if (slots[i] >= count) {
            PyErr_SetString(PyExc_ValueError, "slot out of range");
            goto done;
        }
        words += (size_t)ix->levels[slots[i]] * (1 + ix->M);
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(words * 4));
    if (out) {
        uint32_t *dst = (uint32_t *)PyBytes_AS_STRING(out);
        for (size_t i = 0; i < n; i++) {
            uint32_t s = slots[i];
            size_t w = (size_t)ix->levels[s] * (1 + ix->M);
            if (!w) continue;
            ghnsw_spin_lock(&ix->slot_locks[s]);
            memcpy(dst, ix->upper[s], w * 4);
            ghnsw_spin_unlock(&ix->slot_locks[s]);
            dst += w;
        }
    }
done:
    pthread_rwlock_unlock(&ix->resize_lock);
    PyBuffer_Release(&sl);
    return out;
}

static PyObject *Core_deleted_bitset(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_index_t *ix = IX(self);
    pthread_rwlock_rdlock(&ix->resize_lock);
    PyObject *b = PyBytes_FromStringAndSize((const char *)ix->deleted, (Py_ssize_t)((ix->capacity + 31) / 32 * 4));
    pthread_rwlock_unlock(&ix->resize_lock);
    return b;
}

static PyObject *Core_export_state(CoreObject *self, PyObject *unused) {
    NEED_IX(self);
    ghnsw_index_t *ix = IX(self);
    lock_writers(ix); /* no writer while we copy */
    uint32_t n = ix->count, dim = ix->dim;
    size_t upper_words = 0;
    for (uint32_t s = 0; s < n; s++) upper_words += (size_t)ix->levels[s] * (1 + ix->M);
    PyObject *vec = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * dim * 4);
    PyObject *links = PyBytes_FromStringAndSize((const char *)ix->links0, (Py_ssize_t)n * ix->M0 * 4);
    PyObject *deg = PyBytes_FromStringAndSize((const char *)ix->degree0, (Py_ssize_t)n * 4);
    PyObject *lab = PyBytes_FromStringAndSize((const char *)ix->labels, (Py_ssize_t)n * 8);
    PyObject *lev = PyBytes_FromStringAndSize((const char *)ix->levels, (Py_ssize_t)n);
    PyObject *up = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)upper_words * 4);
    PyObject *del = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    PyObject *d = NULL;
    if (vec && links && deg && lab && lev && up && del) {
        char *v = PyBytes_AS_STRING(vec), *u = PyBytes_AS_STRING(up), *dl = PyBytes_AS_STRING(del);
        for (uint32_t s = 0; s < n; s++) {
            memcpy(v + (size_t)s * dim * 4, ghnsw_vec(ix, s), (size_t)dim * 4);
            size_t w = (size_t)ix->levels[s] * (1 + ix->M) * 4;
            if (w) { memcpy(u, ix->upper[s], w); u += w; }
            dl[s] = (char)ghnsw_bit_get(ix->deleted, s);
        }
        d = Py_BuildValue("{s:s,s:I,s:I,s:I,s:K,s:O,s:I,s:I,s:L,s:i,s:K,s:O,s:O,s:O,s:O,s:O,s:O,s:O}",
                          "space", SPACES[ix->space], "dim", dim, "M", ix->M, "ef_construction", ix->ef_construction,
                          "random_seed", (unsigned long long)ix->seed, "allow_replace_deleted",
                          ix->allow_replace_deleted ? Py_True : Py_False, "max_elements", ix->capacity, "count", n,
                          "entry_point", n ? (long long)ix->entry_point : -1LL, "max_level", ix->max_level,
                          "insert_seq", (unsigned long long)ix->insert_seq, "vectors", vec, "links0", links,
                          "degree0", deg, "labels", lab, "levels", lev, "upper", up, "deleted", del);
    }
    pthread_mutex_unlock(&ix->mut_lock);
    Py_XDECREF(vec); Py_XDECREF(links); Py_XDECREF(deg); Py_XDECREF(lab);
    Py_XDECREF(lev); Py_XDECREF(up); Py_XDECREF(del);
    return d;
}

static int state_buffer(PyObject *d, const char *key, Py_buffer *b) {
    PyObject *o = PyDict_GetItemString(d, key);
    if (!o) { PyErr_Format(PyExc_ValueError, "state: missing '%s'", key); return -1; }
    return PyObject_GetBuffer(o, b, PyBUF_SIMPLE);
}

static int state_int(PyObject *d, const char *key, long long *out) {
    PyObject *o = PyDict_GetItemString(d, key);
    if (!o) { PyErr_Format(PyExc_ValueError, "state: missing '%s'", key); return -1; }
    *out = PyLong_AsLongLong(o);
    if (*out == -1 && PyErr_Occurred()) return -1;
    return 0;
}

/* Core.from_state(dict): a new Core filled from the state layout, everything validated. */
static PyObject *Core_from_state(PyObject *cls, PyObject *d) {
    if (!PyDict_Check(d)) { PyErr_SetString(PyExc_TypeError, "state must be a dict"); return NULL; }
    long long dim, M, efc, seed, cap, count, ep, maxl, seq, allow;
    PyObject *space = PyDict_GetItemString(d, "space");
    if (!space || !PyUnicode_Check(space)) { PyErr_SetString(PyExc_ValueError, "state: bad 'space'"); return NULL; }
    if (state_int(d, "dim", &dim) || state_int(d, "M", &M) || state_int(d, "ef_construction", &efc) ||
        state_int(d, "random_seed", &seed) || state_int(d, "max_elements", &cap) || state_int(d, "count", &count) ||
        state_int(d, "entry_point", &ep) || state_int(d, "max_level", &maxl) || state_int(d, "insert_seq", &seq) ||
        state_int(d, "allow_replace_deleted", &allow))
        return NULL;
    if (dim <= 0 || dim > (1 << 24) || M < 2 || M > 10000 || efc < 0 || efc > (1 << 24) || cap < 0 ||
        cap > GHNSW_MAX_CAPACITY || count < 0 || count > cap || maxl < -1 || maxl > GHNSW_MAX_LEVEL) {
        PyErr_SetString(PyExc_ValueError, "state: parameter out of range");
        return NULL;
    }
    PyObject *args = Py_BuildValue("(OLLLLL)", space, dim, cap, M, efc, seed);
    PyObject *kw = Py_BuildValue("{s:O}", "allow_replace_deleted", allow ? Py_True : Py_False);
    CoreObject *self = args && kw ? (CoreObject *)PyObject_Call(cls, args, kw) : NULL;
    Py_XDECREF(args); Py_XDECREF(kw);
    if (!self) return NULL;
    Py_buffer b[7];
    const char *keys[7] = {"vectors", "links0", "degree0", "labels", "levels", "upper", "deleted"};
    int got = 0;
    for (; got < 7; got++) if (state_buffer(d, keys[got], &b[got]) < 0) break;
    ghnsw_status_t st = GHNSW_OK;
    ghnsw_err_t err = {{0}};
    if (got == 7) {
        ghnsw_state_t in = {(uint32_t)count, ep, (int)maxl, (uint64_t)seq,
                            b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[5].buf, b[4].buf, b[6].buf,
                            (size_t)b[0].len, (size_t)b[1].len, (size_t)b[2].len, (size_t)b[3].len,
                            (size_t)b[4].len, (size_t)b[5].len, (size_t)b[6].len};
        Py_BEGIN_ALLOW_THREADS
        st = ghnsw_import(self->ix, &in, &err);
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    if (got < 7 || st) {
        Py_DECREF(self);
        return got < 7 ? NULL : raise_status(st, &err, PyExc_ValueError);
    }
    return (PyObject *)self;
}

#define GETTER(name, expr) \
    static PyObject *Core_get_##name(CoreObject *self, void *c) { NEED_IX(self); ghnsw_index_t *ix = self->ix; return expr; }
GETTER(space, PyUnicode_FromString(SPACES[ix->space]))
GETTER(dim, PyLong_FromUnsignedLong(ix->dim))
GETTER(dim_pad, PyLong_FromUnsignedLong(ix->dim_pad))
GETTER(M, PyLong_FromUnsignedLong(ix->M))
GETTER(M0, PyLong_FromUnsignedLong(ix->M0))
GETTER(ef_construction, PyLong_FromUnsignedLong(ix->ef_construction))
GETTER(max_elements, PyLong_FromUnsignedLong(ix->capacity))
GETTER(count, PyLong_FromUnsignedLong(__atomic_load_n(&ix->count, __ATOMIC_ACQUIRE)))
GETTER(n_deleted, PyLong_FromUnsignedLong(__atomic_load_n(&ix->n_deleted, __ATOMIC_RELAXED)))
GETTER(entry_point, PyLong_FromLongLong(ix->entry_point == GHNSW_INVALID ? -1LL : (long long)ix->entry_point))
GETTER(max_level, PyLong_FromLong(ix->max_level))
GETTER(random_seed, PyLong_FromUnsignedLongLong(ix->seed))
GETTER(allow_replace_deleted, PyBool_FromLong(ix->allow_replace_deleted))
GETTER(insert_seq, PyLong_FromUnsignedLongLong(ix->insert_seq))
GETTER(memory_bytes, PyLong_FromSize_t(ghnsw_memory_bytes(ix)))
GETTER(count_dirty, PyLong_FromSize_t(ghnsw_count_dirty(ix)))

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
    {NULL}};

static PyMethodDef Core_methods[] = {
    {"add", (PyCFunction)Core_add, METH_VARARGS,
     "add(data f32[n,dim], labels u64[n], n, num_threads, replace_deleted[, graph_cands u32[n,cg], batch_cands u32[n,cb]])"},
    {"search", (PyCFunction)Core_search, METH_VARARGS,
     "search(q f32[nq,dim], nq, k, ef, num_threads, out_labels u64[nq,k], out_dists f32[nq,k], out_found i32[nq], "
     "allowed_bitset|None, callable|None[, want_slots: slot ids instead of labels, "
     "words_per_query: allowed_bitset is u32[nq, words_per_query], one row per query])"},
    {"allowed_bitset", (PyCFunction)Core_allowed_bitset, METH_VARARGS, "allowed_bitset(labels u64[n]) -> bytearray"},
    {"mark_deleted", (PyCFunction)Core_mark_deleted, METH_VARARGS, "mark_deleted(label)"},
    {"unmark_deleted", (PyCFunction)Core_unmark_deleted, METH_VARARGS, "unmark_deleted(label)"},
    {"resize", (PyCFunction)Core_resize, METH_VARARGS, "resize(max_elements)"},
    {"lookup", (PyCFunction)Core_lookup, METH_VARARGS, "lookup(label) -> (slot or -1, deleted)"},
    {"get_vectors", (PyCFunction)Core_get_vectors, METH_VARARGS, "get_vectors(labels u64[n], out f32[n,dim])"},
    {"labels", (PyCFunction)Core_labels, METH_NOARGS, "labels() -> bytes u64[count], slot order"},
    {"neighbors", (PyCFunction)Core_neighbors, METH_VARARGS, "neighbors(label, level) -> bytes u64[deg]"},
    {"levels_of", (PyCFunction)Core_levels_of, METH_VARARGS, "levels_of(labels u64[n], out u8[n])"},
    {"check_integrity", (PyCFunction)Core_check_integrity, METH_NOARGS, "check_integrity() -> dict"},
    {"drain_dirty", (PyCFunction)Core_drain_dirty, METH_NOARGS, "drain_dirty() -> bytes u32[r]"},
    {"gather_rows", (PyCFunction)Core_gather_rows, METH_VARARGS,
     "gather_rows(slots u32[r], vectors f32[r,dim_pad], links u32[r,M0], degree u32[r], labels u64[r], levels u8[r])"},
    {"gather_upper", (PyCFunction)Core_gather_upper, METH_VARARGS,
     "gather_upper(slots u32[r]) -> bytes: each slot's levels[s]*(1+M) uint32 upper block, concatenated"},
    {"deleted_bitset", (PyCFunction)Core_deleted_bitset, METH_NOARGS, "deleted_bitset() -> bytes u32[ceil(cap/32)]"},
    {"export_state", (PyCFunction)Core_export_state, METH_NOARGS, "export_state() -> dict"},
    {"from_state", (PyCFunction)Core_from_state, METH_O | METH_CLASS, "from_state(dict) -> Core"},
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

static PyMethodDef module_methods[] = {
    {"level_for", mod_level_for, METH_VARARGS, "level_for(seed, seq, mult) -> level of the seq-th row"},
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
    return m;
}
