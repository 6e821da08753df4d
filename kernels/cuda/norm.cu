// RMSNorm in f32: y = w * (x / sqrt(mean(x^2) + eps)), one block per row, in place.
// `rows` rows of `n`; `w` has `n` entries (a head's norm applies per head: rows = tokens*heads).
extern "C" __global__ void rms_norm(float* x, const float* w, int n, float eps) {
    float* row = x + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += row[i] * row[i];
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = w[i] * (row[i] * inv);
}

// out = rmsnorm(x) without touching x (the residual stream stays in f32).
extern "C" __global__ void rms_norm_to(const float* x, const float* w, float* out, int n, float eps) {
    const float* row = x + (size_t)blockIdx.x * n;
    float* o = out + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += row[i] * row[i];
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = w[i] * (row[i] * inv);
}
