// Paged attention over the KV cache layout `[block][slot][kv_head][head_dim]` (f32), with
// online softmax. Query row r attends to keys lo..=pos[r] of its own sequence (the block table
// at tables + table_off[r]); lo = pos + 1 - window under a sliding window, else 0. Query head
// h reads kv head h / (heads / kv_heads). head_dim is at most 256 (lanes past it idle).
#define DPL_MAX 8   // head_dim / 32
#define RPW_MAX 4   // query rows per warp in the prefill tile

__device__ __forceinline__ size_t kv_offset(const u32* tab, int j, int bs, int kvw, int g, int d) {
    return ((size_t)tab[j / bs] * bs + (j % bs)) * kvw + (size_t)g * d;
}

// Decode (and any single row): one block per (row, head); warps split the keys, lanes split
// head_dim; the warps' partial softmax states are merged at the end (flash-decoding).
extern "C" __global__ void paged_attention_decode(
    const float* q, const float* kc, const float* vc, const u32* tables, const u32* table_off,
    const u32* pos, float* out, int heads, int kvh, int d, int bs, float scale, int window) {
    __shared__ float sm[32], sl[32];
    __shared__ float sacc[8][256];
    int r = blockIdx.x, h = blockIdx.y;
    int g = h / (heads / kvh);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int hi = (int)pos[r] + 1;
    int lo = (window > 0 && window < hi) ? hi - window : 0;
    const u32* tab = tables + table_off[r];
    int kvw = kvh * d;
    const float* qr = q + ((size_t)r * heads + h) * d;
    float qv[DPL_MAX], acc[DPL_MAX];
#pragma unroll
    for (int c = 0; c < DPL_MAX; c++) {
        int i = c * 32 + lane;
        qv[c] = i < d ? qr[i] * scale : 0.0f;
        acc[c] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int j = lo + warp; j < hi; j += nw) {
        size_t base = kv_offset(tab, j, bs, kvw, g, d);
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < DPL_MAX; c++) {
            int i = c * 32 + lane;
            if (i < d) s += qv[c] * kc[base + i];
        }
        s = warp_sum(s);
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), e = expf(s - mn);
        l = l * corr + e;
#pragma unroll
        for (int c = 0; c < DPL_MAX; c++) {
            int i = c * 32 + lane;
            if (i < d) acc[c] = acc[c] * corr + e * vc[base + i];
        }
        m = mn;
    }
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
    for (int c = 0; c < DPL_MAX; c++) {
        int i = c * 32 + lane;
        if (i < d) sacc[warp][i] = acc[c];
    }
    __syncthreads();
    if (warp == 0) {
        float M = NEG_INF;
        for (int w = 0; w < nw; w++) M = fmaxf(M, sm[w]);
        float L = 0.0f;
        for (int w = 0; w < nw; w++) L += sl[w] * expf(sm[w] - M);
        float* o = out + ((size_t)r * heads + h) * d;
        for (int i = lane; i < d; i += 32) {
            float v = 0.0f;
            for (int w = 0; w < nw; w++) v += sacc[w][i] * expf(sm[w] - M);
            o[i] = v / L;
        }
    }
}

// Prefill: one block per (tile, head). A tile is up to `tq` consecutive rows of one sequence
// at consecutive positions (tile_row[t], tile_len[t]); keys stream through shared memory `tk`
// at a time (tk <= 32) and every row keeps an online-softmax state, so memory stays
// O(tile) for any context length. Dynamic shared memory: (tq*d + tk*(d+1) + tk*d) floats.
extern "C" __global__ void paged_attention_prefill(
    const float* q, const float* kc, const float* vc, const u32* tables, const u32* table_off,
    const u32* pos, const u32* tile_row, const u32* tile_len, float* out, int heads, int kvh,
    int d, int bs, float scale, int window, int tk) {
    extern __shared__ float smem[];
    int t = blockIdx.x, h = blockIdx.y;
    int g = h / (heads / kvh);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int r0 = tile_row[t], n = tile_len[t];
    int p0 = pos[r0];
    const u32* tab = tables + table_off[r0];
    int kvw = kvh * d;
    float* Qs = smem;                    // [n][d]
    float* Ks = Qs + n * d;              // [tk][d + 1] (padded: lanes read different keys)
    float* Vs = Ks + tk * (d + 1);       // [tk][d]
    for (int x = threadIdx.x; x < n * d; x += blockDim.x) {
        int i = x / d, c = x % d;
        Qs[x] = q[((size_t)(r0 + i) * heads + h) * d + c] * scale;
    }
    int hi = p0 + n;
    int lo = (window > 0 && window < p0 + 1) ? p0 + 1 - window : 0;
    float m[RPW_MAX], l[RPW_MAX], acc[RPW_MAX][DPL_MAX];
#pragma unroll
    for (int ri = 0; ri < RPW_MAX; ri++) {
        m[ri] = NEG_INF;
        l[ri] = 0.0f;
#pragma unroll
        for (int c = 0; c < DPL_MAX; c++) acc[ri][c] = 0.0f;
    }
    for (int kt = lo; kt < hi; kt += tk) {
        __syncthreads();
        for (int x = threadIdx.x; x < tk * d; x += blockDim.x) {
            int j = x / d, c = x % d, key = kt + j;
            float kv = 0.0f, vv = 0.0f;
            if (key < hi) {
                size_t base = kv_offset(tab, key, bs, kvw, g, d);
                kv = kc[base + c];
                vv = vc[base + c];
            }
            Ks[j * (d + 1) + c] = kv;
            Vs[j * d + c] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int ri = 0; ri < RPW_MAX; ri++) {
            int i = warp + ri * nw;
            if (i >= n) continue;
            int prow = p0 + i;
            int rlo = (window > 0 && window < prow + 1) ? prow + 1 - window : 0;
            int key = kt + lane;
            bool valid = lane < tk && key <= prow && key >= rlo;
            float s = NEG_INF;
            if (valid) {
                s = 0.0f;
                const float* qi = Qs + i * d;
                const float* kj = Ks + lane * (d + 1);
                for (int c = 0; c < d; c++) s += qi[c] * kj[c];
            }
            float mt = warp_max(s);
            if (mt == NEG_INF) continue;
            float mn = fmaxf(m[ri], mt);
            float corr = expf(m[ri] - mn);
            float e = valid ? expf(s - mn) : 0.0f;
            l[ri] = l[ri] * corr + warp_sum(e);
#pragma unroll
            for (int c = 0; c < DPL_MAX; c++) acc[ri][c] *= corr;
            for (int jj = 0; jj < tk; jj++) {
                float pj = __shfl_sync(0xffffffffu, e, jj);
                if (pj == 0.0f) continue;
#pragma unroll
                for (int c = 0; c < DPL_MAX; c++) {
                    int dd = c * 32 + lane;
                    if (dd < d) acc[ri][c] += pj * Vs[jj * d + dd];
                }
            }
            m[ri] = mn;
        }
    }
#pragma unroll
    for (int ri = 0; ri < RPW_MAX; ri++) {
        int i = warp + ri * nw;
        if (i >= n) continue;
        float* o = out + ((size_t)(r0 + i) * heads + h) * d;
#pragma unroll
        for (int c = 0; c < DPL_MAX; c++) {
            int dd = c * 32 + lane;
            if (dd < d) o[dd] = acc[ri][c] / l[ri];
        }
    }
}

// Writes the new keys and values of every row into the cache: row r at position pos[r].
// k, v: [rows, kv_heads * d]. One block per row.
extern "C" __global__ void kv_write(const float* k, const float* v, float* kc, float* vc,
                                    const u32* tables, const u32* table_off, const u32* pos,
                                    int kvw, int bs) {
    int r = blockIdx.x;
    const u32* tab = tables + table_off[r];
    int p = pos[r];
    size_t base = ((size_t)tab[p / bs] * bs + (p % bs)) * kvw;
    for (int i = threadIdx.x; i < kvw; i += blockDim.x) {
        kc[base + i] = k[(size_t)r * kvw + i];
        vc[base + i] = v[(size_t)r * kvw + i];
    }
}
