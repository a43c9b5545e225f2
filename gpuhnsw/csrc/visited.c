/* Per-thread visited tables from a pool: a uint16 generation tag per slot, reset in O(1) by bumping
 * the generation (a full clear only every 65535 uses). */
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"

ghnsw_visited_t *ghnsw_visited_get(ghnsw_visited_pool_t *p) {
    pthread_mutex_lock(&p->lock);
    ghnsw_visited_t *v = p->free_list;
    if (v) p->free_list = v->next;
    size_t n = p->n;
    pthread_mutex_unlock(&p->lock);
    if (!v) {
        v = calloc(1, sizeof(*v));
        if (!v) return NULL;
        v->tags = calloc(n ? n : 1, sizeof(uint16_t));
        if (!v->tags) { free(v); return NULL; }
        v->n = n;
        v->gen = 0;
    }
    if (++v->gen == 0) { /* wrapped: stale tags could alias the new generation */
        memset(v->tags, 0, v->n * sizeof(uint16_t));
        v->gen = 1;
    }
    return v;
}

void ghnsw_visited_put(ghnsw_visited_pool_t *p, ghnsw_visited_t *v) {
    pthread_mutex_lock(&p->lock);
    if (v->n == p->n) { v->next = p->free_list; p->free_list = v; v = NULL; }
    pthread_mutex_unlock(&p->lock);
    if (v) { free(v->tags); free(v); } /* sized for an older capacity */
}

void ghnsw_visited_pool_clear(ghnsw_visited_pool_t *p) {
    pthread_mutex_lock(&p->lock);
    ghnsw_visited_t *v = p->free_list;
    p->free_list = NULL;
    pthread_mutex_unlock(&p->lock);
    while (v) {
        ghnsw_visited_t *next = v->next;
        free(v->tags);
        free(v);
        v = next;
    }
}

/* Start a new, empty generation on a table already taken from the pool. */
void ghnsw_visited_next(ghnsw_visited_t *v) {
    if (++v->gen == 0) {
        memset(v->tags, 0, v->n * sizeof(uint16_t));
        v->gen = 1;
    }
}
