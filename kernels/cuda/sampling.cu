// Token sampling, one block per row: greedy (temperature 0: argmax, first index on ties) or
// temperature, then top-k, top-p, min-p, as the CPU sampler filters (softmax over the top-k
// survivors; top-p keeps the most likely tokens until their mass reaches p, the crossing token
// included; min-p keeps tokens at least min_p times the most likely one). The uniform draw
// `u[r]` in [0, 1) comes from the request's seeded generator on the host, so a request's
// draws do not depend on the batch it is in. Thresholds are found by radix selection over
// order-preserving float bits: no sort, O(32 * vocab / threads) per row.
// Launch with 256 threads.

__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ u32 block_count_ge(const float* x, int n, u32 key) {
    float c = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) c += order_key(x[i]) >= key ? 1.0f : 0.0f;
    return (u32)(block_sum(c) + 0.5f);
}

extern "C" __global__ void sample_rows(float* logits, int vocab, const float* temperature,
                                       const int* top_k, const float* top_p, const float* min_p,
                                       const float* u, u32* out) {
    __shared__ float chunk_sum[256];
    __shared__ u32 result;
    int r = blockIdx.x;
    float* x = logits + (size_t)r * vocab;
    float t = temperature[r];
    int tid = threadIdx.x;
    if (t == 0.0f) {
        // Argmax, lowest index on ties: reduce (value, index) pairs.
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int i = tid; i < vocab; i += blockDim.x)
            if (x[i] > bv) { bv = x[i]; bi = i; }
        __shared__ float sv[256];
        __shared__ int si[256];
        sv[tid] = bv;
        si[tid] = bi;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (tid < s) {
                float ov = sv[tid + s];
                int oi = si[tid + s];
                if (ov > sv[tid] || (ov == sv[tid] && oi < si[tid])) { sv[tid] = ov; si[tid] = oi; }
            }
            __syncthreads();
        }
        if (tid == 0) out[r] = (u32)si[0];
        return;
    }
    for (int i = tid; i < vocab; i += blockDim.x) x[i] = x[i] / t;
    __syncthreads();
    float mx = NEG_INF;
    for (int i = tid; i < vocab; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx);
    // Top-k: the k-th largest scaled logit by radix selection (ties at it are all kept).
    int k = top_k[r];
    u32 kth = 0;
    if (k > 0 && k < vocab) {
        for (int b = 31; b >= 0; b--) {
            u32 cand = kth | (1u << b);
            if (block_count_ge(x, vocab, cand) >= (u32)k) kth = cand;
        }
    }
    // Probabilities of the survivors, in place (0 for the filtered).
    float z = 0.0f;
    for (int i = tid; i < vocab; i += blockDim.x) z += order_key(x[i]) >= kth ? expf(x[i] - mx) : 0.0f;
    z = block_sum(z);
    for (int i = tid; i < vocab; i += blockDim.x)
        x[i] = order_key(x[i]) >= kth ? expf(x[i] - mx) / z : 0.0f;
    __syncthreads();
    float pmax = 1.0f / z;
    // Top-p: the largest probability T whose tokens at or above it hold at least p.
    float p = top_p[r];
    float keep_from = 0.0f;
    if (p < 1.0f) {
        u32 key = 0;
        for (int b = 31; b >= 0; b--) {
            u32 cand = key | (1u << b);
            float mass = 0.0f;
            for (int i = tid; i < vocab; i += blockDim.x) mass += order_key(x[i]) >= cand ? x[i] : 0.0f;
            if (block_sum(mass) >= p) key = cand;
        }
        // Back from key to the float it encodes (probabilities are >= 0).
        keep_from = __uint_as_float(key & 0x7fffffffu);
    }
    float mp = min_p[r];
    if (mp > 0.0f) keep_from = fmaxf(keep_from, pmax * mp);
    // Draw: inverse CDF over the kept tokens in index order; each thread owns a contiguous chunk.
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int beg = tid * per, end = beg + per < vocab ? beg + per : vocab;
    float s = 0.0f;
    for (int i = beg; i < end; i++) if (x[i] > 0.0f && x[i] >= keep_from) s += x[i];
    chunk_sum[tid] = s;
    __shared__ float total_s;
    __syncthreads();
    if (tid == 0) {
        float total = 0.0f;
        for (int i = 0; i < (int)blockDim.x; i++) {
            float c = chunk_sum[i];
            chunk_sum[i] = total;
            total += c;
        }
        total_s = total;
        result = 0xffffffffu;
    }
    __syncthreads();
    float target = u[r] * total_s;
    float cum = chunk_sum[tid];
    // The thread whose chunk holds the target walks it.
    if (s > 0.0f && target >= cum && target < cum + s) {
        for (int i = beg; i < end; i++) {
            if (x[i] > 0.0f && x[i] >= keep_from) {
                cum += x[i];
                if (target < cum) {
                    atomicMin(&result, (u32)i);
                    break;
                }
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        if (result == 0xffffffffu) {
            // Rounding at the top of the CDF: the last kept token.
            for (int i = vocab - 1; i >= 0; i--)
                if (x[i] > 0.0f && x[i] >= keep_from) { result = (u32)i; break; }
        }
        out[r] = result;
    }
}
