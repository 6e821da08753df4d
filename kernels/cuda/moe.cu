// Mixture-of-experts routing and the pack/unpack around expert dispatch.

// Router top-k: softmax over `E` logits in f32, the `k` largest in descending order (ties to
// the lower expert id), optionally renormalised. One thread per token; E <= 1024, k <= 32.
extern "C" __global__ void route_topk(const float* logits, int rows, int E, int k, int normalize,
                                      u32* ids, float* weights) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* l = logits + (size_t)r * E;
    float m = NEG_INF;
    for (int e = 0; e < E; e++) m = fmaxf(m, l[e]);
    float sum = 0.0f;
    for (int e = 0; e < E; e++) sum += expf(l[e] - m);
    int chosen[32];
    float wsum = 0.0f;
    for (int s = 0; s < k; s++) {
        int best = -1;
        float bv = 0.0f;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int j = 0; j < s; j++) taken |= chosen[j] == e;
            if (taken) continue;
            float p = expf(l[e] - m) / sum;
            if (best < 0 || p > bv) { best = e; bv = p; }
        }
        chosen[s] = best;
        ids[(size_t)r * k + s] = (u32)best;
        weights[(size_t)r * k + s] = bv;
        wsum += bv;
    }
    if (normalize)
        for (int s = 0; s < k; s++) weights[(size_t)r * k + s] /= wsum;
}

// Permute (pack by expert): dst[i] = src[idx[i]], rows of `cols`; one block per output row.
extern "C" __global__ void gather_rows(const float* src, const u32* idx, float* dst, int cols) {
    const float* s = src + (size_t)idx[blockIdx.x] * cols;
    float* d = dst + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) d[i] = s[i];
}

// Unpermute and combine: out[t] = sum_s w[t, s] * packed[slot_row[t, s]], summed in slot order
// (the order never depends on where an expert ran). One block per token.
extern "C" __global__ void combine_slots(const float* packed, const u32* slot_row, const float* w,
                                         float* out, int k, int h) {
    int t = blockIdx.x;
    float* o = out + (size_t)t * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < k; s++)
            acc += w[t * k + s] * packed[(size_t)slot_row[t * k + s] * h + i];
        o[i] = acc;
    }
}
