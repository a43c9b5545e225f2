/* The HNSW diversity heuristic (hnswlib getNeighborsByHeuristic2): walk candidates from the closest,
 * keep one only if it is closer to the base point than to every neighbour already kept. */
#include "gpuhnsw.h"

uint32_t ghnsw_select_heuristic(const ghnsw_index_t *ix, ghnsw_cand_t *cand, uint32_t n, uint32_t m) {
    if (n <= m) return n;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < n && kept < m; i++) {
        int good = 1;
        for (uint32_t j = 0; j < kept; j++) {
            if (ghnsw_pair(ix, cand[i].id, cand[j].id) < cand[i].d) { good = 0; break; }
        }
        if (good) cand[kept++] = cand[i];
    }
    return kept;
}
