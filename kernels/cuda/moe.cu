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

// Small-batch expert FFN without host round-trips: one block row per (token, slot) pair p,
// reading its expert's weights through per-expert pointer tables (`wbf16`: bf16 weights, the
// input rounded to bf16 as the bf16 GEMM path does; else f32). A warp computes one output row.
// Stage 1: act[p, j] = silu(gate_e[j] . x[t]) * (up_e[j] . x[t]).
__device__ __forceinline__ float dot_row(const void* w, int wbf16, const float* xs, int n,
                                         int lane) {
    float acc = 0.0f;
    if (wbf16) {
        const bf16_t* r = (const bf16_t*)w;
        if ((n & 1) == 0) {
            for (int i = lane * 2; i < n; i += 64) {
                u32 v = *(const u32*)(r + i);
                acc += bf16_to_f32((bf16_t)(v & 0xffffu)) * xs[i];
                acc += bf16_to_f32((bf16_t)(v >> 16)) * xs[i + 1];
            }
        } else {
            for (int i = lane; i < n; i += 32) acc += bf16_to_f32(r[i]) * xs[i];
        }
    } else {
        const float* r = (const float*)w;
        for (int i = lane; i < n; i += 32) acc += r[i] * xs[i];
    }
    return warp_sum(acc);
}

extern "C" __global__ void moe_gate_up_gemv(const float* x, const u32* ids, int k,
                                            const unsigned long long* gate,
                                            const unsigned long long* up, int wbf16,
                                            float* act, int h, int inter) {
    extern __shared__ float xs[];
    int p = blockIdx.x, tok = p / k;
    u32 e = ids[p];
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = x[(size_t)tok * h + i];
        xs[i] = wbf16 ? bf16_to_f32(f32_to_bf16(v)) : v;
    }
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int j = blockIdx.y * nw + warp;
    if (j >= inter) return;
    size_t es = wbf16 ? 2 : 4;
    const char* gw = (const char*)gate[e] + (size_t)j * h * es;
    const char* uw = (const char*)up[e] + (size_t)j * h * es;
    float g = dot_row(gw, wbf16, xs, h, lane);
    float u = dot_row(uw, wbf16, xs, h, lane);
    if (lane == 0) act[(size_t)p * inter + j] = g / (1.0f + expf(-g)) * u;
}

// Stage 2: y[p, j] = down_e[j] . act[p].
extern "C" __global__ void moe_down_gemv(const float* act, const u32* ids,
                                         const unsigned long long* down, int wbf16, float* y,
                                         int h, int inter) {
    extern __shared__ float as[];
    int p = blockIdx.x;
    u32 e = ids[p];
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        float v = act[(size_t)p * inter + i];
        as[i] = wbf16 ? bf16_to_f32(f32_to_bf16(v)) : v;
    }
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int j = blockIdx.y * nw + warp;
    if (j >= h) return;
    size_t es = wbf16 ? 2 : 4;
    const char* dw = (const char*)down[e] + (size_t)j * inter * es;
    float v = dot_row(dw, wbf16, as, inter, lane);
    if (lane == 0) y[(size_t)p * h + j] = v;
}

// hs[t] += sum_s w[t, s] * y[t * k + s], the sum in slot order (as combine_slots), then added
// to the residual. One block per token.
extern "C" __global__ void combine_add(const float* y, const float* w, float* hs, int k, int h) {
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < k; s++) acc += w[t * k + s] * y[((size_t)t * k + s) * h + i];
        hs[(size_t)t * h + i] += acc;
    }
}
