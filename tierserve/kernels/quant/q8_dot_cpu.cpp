// Integer-dot matmul of GGUF Q4_1 / Q8_0 weight blocks with Q8 activations (q8_dot_cpu.py states the algorithm).
//
// Weights stay in their GGUF blocks, one row of N after the other ([N, K/32] blocks):
//   Q4_1: fp16 d, fp16 m, 16 bytes: element j (< 16) in the low nibble of byte j, element j + 16 in its high
//         nibble; w = d q + m, q in 0..15.                                      (20 bytes per 32 weights)
//   Q8_0: fp16 d, 32 int8 q; w = d q.                                           (34 bytes per 32 weights)
// Activations x [M, K] float32 are quantized per row and block of 32: dx = max|x| / 127,
// xq = round-half-away(x / dx) in -127..127, sx = dx * sum(xq).
// Block dot: Q4_1: d dx sum(q xq) + m sx;  Q8_0: d dx sum(q xq). The integer sums are exact (int32);
// each block's product is added to a float32 accumulator (8 lanes under AVX2, one otherwise).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define Q8DOT_AVX2 1
#else
#define Q8DOT_AVX2 0
#endif

namespace {

constexpr int QK = 32;

inline float half_to_float(uint16_t h) {
#if Q8DOT_AVX2
    return _cvtsh_ss(h);
#else
    return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

struct QRow {  // one activation row, quantized
    std::vector<int8_t> q;
    std::vector<float> d, s;
};

void quantize_row(const float* x, int64_t k, QRow& out) {
    const int64_t nb = k / QK;
    out.q.resize(k);
    out.d.resize(nb);
    out.s.resize(nb);
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 127.f;
        const float id = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; ++j) {
            const int v = static_cast<int>(std::round(xb[j] * id));  // half away from zero
            out.q[b * QK + j] = static_cast<int8_t>(v);
            sum += v;
        }
        out.d[b] = d;
        out.s[b] = d * static_cast<float>(sum);
    }
}

struct XRef {  // a quantized row's arrays as plain pointers (no reloads through the vectors in the inner loops)
    const int8_t* q;
    const float* d;
    const float* s;
};

#if Q8DOT_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// Dots of one weight row ``w`` (``nb`` blocks) with activation rows ``x[0..R)`` (R <= ROWS), into ``out[r * stride]``:
// each weight block is loaded and unpacked once for the R rows.
constexpr int ROWS = 4;

template <int R>
void dots_q4_1(const uint8_t* w, const XRef* __restrict__ x, int64_t nb, float* out, int64_t stride) {
#if Q8DOT_AVX2
    __m256 acc[R];
    float mins[R];
    for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); mins[r] = 0.f; }
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; ++b, w += 20) {
        uint16_t dh, mh;
        std::memcpy(&dh, w, 2);
        std::memcpy(&mh, w + 2, 2);
        const float d = half_to_float(dh), m = half_to_float(mh);
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 4));
        const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
        for (int r = 0; r < R; ++r) {
            const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r].q + b * QK));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[r].d[b]), _mm256_cvtepi32_ps(p), acc[r]);
            mins[r] += m * x[r].s[b];
        }
    }
    for (int r = 0; r < R; ++r) out[r * stride] = hsum(acc[r]) + mins[r];
#else
    for (int r = 0; r < R; ++r) {
        const uint8_t* wb = w;
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b, wb += 20) {
            uint16_t dh, mh;
            std::memcpy(&dh, wb, 2);
            std::memcpy(&mh, wb + 2, 2);
            const int8_t* xq = x[r].q + b * QK;
            int sum = 0;
            for (int j = 0; j < 16; ++j) sum += (wb[4 + j] & 0x0F) * xq[j] + (wb[4 + j] >> 4) * xq[j + 16];
            acc += half_to_float(dh) * x[r].d[b] * static_cast<float>(sum) + half_to_float(mh) * x[r].s[b];
        }
        out[r * stride] = acc;
    }
#endif
}

template <int R>
void dots_q8_0(const uint8_t* w, const XRef* __restrict__ x, int64_t nb, float* out, int64_t stride) {
#if Q8DOT_AVX2
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; ++b, w += 34) {
        uint16_t dh;
        std::memcpy(&dh, w, 2);
        const float d = half_to_float(dh);
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
        const __m256i aq = _mm256_sign_epi8(q, q);  // |q|: maddubs takes unsigned x signed; q's sign moves to x
        for (int r = 0; r < R; ++r) {
            const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r].q + b * QK));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(xq, q)), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[r].d[b]), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) out[r * stride] = hsum(acc[r]);
#else
    for (int r = 0; r < R; ++r) {
        const uint8_t* wb = w;
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b, wb += 34) {
            uint16_t dh;
            std::memcpy(&dh, wb, 2);
            const int8_t* q = reinterpret_cast<const int8_t*>(wb + 2);
            const int8_t* xq = x[r].q + b * QK;
            int sum = 0;
            for (int j = 0; j < QK; ++j) sum += q[j] * xq[j];
            acc += half_to_float(dh) * x[r].d[b] * static_cast<float>(sum);
        }
        out[r * stride] = acc;
    }
#endif
}

template <int R>
void dots(int64_t kind, const uint8_t* w, const XRef* __restrict__ x, int64_t nb, float* out, int64_t stride) {
    if (kind == 0) dots_q4_1<R>(w, x, nb, out, stride); else dots_q8_0<R>(w, x, nb, out, stride);
}

}  // namespace

// y [M, N] = x [M, K] W^T for W in GGUF blocks ``blocks`` [N, K/32 * block_bytes] (uint8); kind 0: Q4_1, 1: Q8_0.
torch::Tensor q8_dot_mm(torch::Tensor x, torch::Tensor blocks, int64_t kind) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: float32 [M, K] expected");
    TORCH_CHECK(blocks.dtype() == torch::kUInt8 && blocks.dim() == 2, "blocks: uint8 [N, bytes] expected");
    TORCH_CHECK(kind == 0 || kind == 1, "kind: 0 (Q4_1) or 1 (Q8_0)");
    x = x.contiguous();
    blocks = blocks.contiguous();
    const int64_t m = x.size(0), k = x.size(1), n = blocks.size(0);
    const int64_t bb = kind == 0 ? 20 : 34;
    TORCH_CHECK(k % QK == 0, "K must be a multiple of 32, got ", k);
    TORCH_CHECK(blocks.size(1) == k / QK * bb, "blocks: ", k / QK * bb, " bytes per row expected for K=", k,
                ", got ", blocks.size(1));
    std::vector<QRow> rows(m);
    const float* xp = x.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r) quantize_row(xp + r * k, k, rows[r]);
    auto y = torch::empty({m, n}, x.options());
    float* yp = y.data_ptr<float>();
    const uint8_t* wp = blocks.data_ptr<uint8_t>();
    const int64_t nb = k / QK, row_bytes = nb * bb;
    std::vector<XRef> xs(m);
    for (int64_t r = 0; r < m; ++r) xs[r] = {rows[r].q.data(), rows[r].d.data(), rows[r].s.data()};
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
            const uint8_t* w = wp + j * row_bytes;
            int64_t r = 0;
            for (; r + ROWS <= m; r += ROWS) dots<ROWS>(kind, w, xs.data() + r, nb, yp + r * n + j, n);
            switch (m - r) {
                case 3: dots<3>(kind, w, xs.data() + r, nb, yp + r * n + j, n); break;
                case 2: dots<2>(kind, w, xs.data() + r, nb, yp + r * n + j, n); break;
                case 1: dots<1>(kind, w, xs.data() + r, nb, yp + r * n + j, n); break;
                default: break;
            }
        }
    });
    return y;
}

bool q8_dot_simd() { return Q8DOT_AVX2; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("q8_dot_mm", &q8_dot_mm, "GGUF Q4_1 / Q8_0 blocks times Q8 activations (q8_dot_cpu.py)");
    mod.def("simd", &q8_dot_simd, "whether the AVX2 path was compiled in");
}
