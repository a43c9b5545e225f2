/* A tiny fan-out: workers pull indices from an atomic counter, so uneven items balance themselves. */
#include <sched.h> /* sched_getaffinity, CPU_COUNT: setup.py builds with _GNU_SOURCE */
#include <stdlib.h>
#include <unistd.h>

#include "gpuhnsw.h"

typedef struct {
    size_t n;
    size_t next;   /* atomic */
    int failed;    /* atomic: first non-zero result */
    ghnsw_task_fn fn;
    void *ctx;
} pool_t;

typedef struct { pool_t *pool; int worker; } worker_arg_t;

static void run_worker(pool_t *p, int worker) {
    for (;;) {
        if (__atomic_load_n(&p->failed, __ATOMIC_RELAXED)) return;
        size_t i = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        if (i >= p->n) return;
        int rc = p->fn(p->ctx, i, worker);
        if (rc) {
            int zero = 0;
            __atomic_compare_exchange_n(&p->failed, &zero, rc, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
            return;
        }
    }
}

static void *thread_main(void *arg) {
    worker_arg_t *a = arg;
    run_worker(a->pool, a->worker);
    return NULL;
}

/* The CPUs this process may run on (its affinity mask: taskset, batch schedulers), as the Python
 * side's _validate.cpu_count(); every online core where the mask cannot be read. */
int ghnsw_default_threads(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int ghnsw_parallel_for(size_t n, int num_threads, ghnsw_task_fn fn, void *ctx) {
    pool_t p = {n, 0, 0, fn, ctx};
    if (num_threads <= 0) num_threads = ghnsw_default_threads();
    if ((size_t)num_threads > n) num_threads = (int)(n ? n : 1);
    pthread_t *tids = NULL;
    worker_arg_t *args = NULL;
    int started = 0;
    if (num_threads > 1) {
        tids = malloc(sizeof(pthread_t) * (size_t)(num_threads - 1));
        args = malloc(sizeof(worker_arg_t) * (size_t)(num_threads - 1));
        if (tids && args) {
            for (int t = 0; t < num_threads - 1; t++) {
                args[t].pool = &p;
                args[t].worker = t + 1;
                if (pthread_create(&tids[t], NULL, thread_main, &args[t]) != 0) break;
                started++;
            }
        }
    }
    run_worker(&p, 0); /* the calling thread works too; fewer threads if creation failed */
    for (int t = 0; t < started; t++) pthread_join(tids[t], NULL);
    free(tids);
    free(args);
    return p.failed;
}
