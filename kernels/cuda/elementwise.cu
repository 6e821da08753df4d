// Element-wise ops of the forward pass.

// a[i] += b[i]
extern "C" __global__ void add_inplace(float* a, const float* b, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += b[i];
}

// x[r, j] += bias[j] for `rows` rows of `n`.
extern "C" __global__ void add_bias(float* x, const float* bias, int n, long long total) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += bias[i % n];
}

// SiLU-gated activation, in place on the gate: g = silu(g) * u.
extern "C" __global__ void silu_mul(float* g, const float* u, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = g[i];
        g[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

// Activations rounded to bf16 for the bf16 GEMMs (inputs in bf16, f32 accumulate).
extern "C" __global__ void to_bf16(const float* x, bf16_t* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f32_to_bf16(x[i]);
}

// Embedding rows: out[r] = table[tokens[r]] (table rows of `h`).
extern "C" __global__ void embed_f32(const float* table, const u32* tokens, float* out, int h) {
    const float* src = table + (size_t)tokens[blockIdx.x] * h;
    float* dst = out + (size_t)blockIdx.x * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void embed_bf16(const bf16_t* table, const u32* tokens, float* out, int h) {
    const bf16_t* src = table + (size_t)tokens[blockIdx.x] * h;
    float* dst = out + (size_t)blockIdx.x * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) dst[i] = bf16_to_f32(src[i]);
}
