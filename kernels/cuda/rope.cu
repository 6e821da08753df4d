// Rotary embeddings, Hugging Face's rotate_half layout (the two halves of a head are the two
// components). Angles are f32(position) * inv_freq rounded to f32, like the reference; the
// scheme (default, linear, YaRN) is carried entirely by `inv_freq` and `attn_factor`.
// x: [rows, heads, dim]; one block per row.
extern "C" __global__ void rope(float* x, const u32* pos, const float* inv_freq,
                                float attn_factor, int heads, int dim) {
    int half = dim >> 1;
    float p = (float)pos[blockIdx.x];
    float* row = x + (size_t)blockIdx.x * heads * dim;
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
        int h = j / half, i = j % half;
        float a = p * inv_freq[i];
        float c = cosf(a) * attn_factor, s = sinf(a) * attn_factor;
        float* hd = row + h * dim;
        float x1 = hd[i], x2 = hd[i + half];
        hd[i] = x1 * c - x2 * s;
        hd[i + half] = x2 * c + x1 * s;
    }
}
