// Decode attention over plain fp32 KV pages, read in place (paged_decode_cpu.py states the algorithm).
//
// q [B, Hq, D], pages k/v [NB, BS, Hkv, D], table [B, W] int64 block ids, lens [B] int32 context lengths.
// Task (b, kv head h): the G = Hq / Hkv query heads of h against keys j in [lo, L) (lo = max(0, L - window)
// with a window, else 0), key j at page table[b][j / BS], row j % BS:
//   pass 1: s_gj = scale * q_g . k_j (then cap * tanh(s / cap) with soft-capping), m_g = max_j s_gj;
//   pass 2: p_gj = exp(s_gj - m_g), z_g = sum_j p_gj;
//   pass 3: out_g = (sum_j p_gj v_j) / z_g.
// Tasks are split over torch's intra-op threads; each thread keeps its scores in a thread_local buffer.
// AVX2: dot products and the weighted sums 8 lanes at a time when D is a multiple of 8.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PD_AVX2 1
#else
#define PD_AVX2 0
#endif

namespace {

inline float dot(const float* a, const float* b, int64_t d) {
#if PD_AVX2
    if (d % 16 == 0) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        }
        const __m256 s = _mm256_add_ps(s0, s1);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        return _mm_cvtss_f32(h);
    }
#endif
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
    return s;
}

inline void axpy(float* y, float a, const float* x, int64_t d) {
#if PD_AVX2
    if (d % 8 == 0) {
        const __m256 va = _mm256_set1_ps(a);
        for (int64_t i = 0; i < d; i += 8)
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        return;
    }
#endif
    for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor table,
                           torch::Tensor lens, double scale, int64_t window, double softcap) {
    TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.is_contiguous(),
                "q must be contiguous float32 [B, Hq, D]");
    TORCH_CHECK(kc.dim() == 4 && kc.scalar_type() == torch::kFloat && kc.is_contiguous() &&
                    vc.sizes() == kc.sizes() && vc.scalar_type() == torch::kFloat && vc.is_contiguous(),
                "k and v pages must be contiguous float32 [NB, BS, Hkv, D] of one shape");
    const int64_t b_n = q.size(0), hq = q.size(1), d = q.size(2);
    const int64_t nb = kc.size(0), bs = kc.size(1), hkv = kc.size(2);
    TORCH_CHECK(kc.size(3) == d && hkv > 0 && hq % hkv == 0, "head_dim differs or Hq is not a multiple of Hkv");
    TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kLong && table.size(0) == b_n &&
                    table.stride(1) == 1, "table must be int64 [B, W] with unit column stride");
    TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == torch::kInt && lens.size(0) == b_n && lens.is_contiguous(),
                "lens must be contiguous int32 [B]");
    const int64_t* tab = table.data_ptr<int64_t>();
    const int64_t tstride = table.stride(0), width = table.size(1);
    const int32_t* len = lens.data_ptr<int32_t>();
    for (int64_t b = 0; b < b_n; ++b) {
        TORCH_CHECK(len[b] >= 1 && len[b] <= width * bs, "sequence ", b, ": length ", len[b], " outside 1..",
                    width * bs);
        for (int64_t p = 0; p < (len[b] + bs - 1) / bs; ++p)
            TORCH_CHECK(tab[b * tstride + p] >= 0 && tab[b * tstride + p] < nb, "sequence ", b, ": block id ",
                        tab[b * tstride + p], " out of range");
    }
    auto out = torch::empty_like(q);
    const float* qp = q.data_ptr<float>();
    const float* kp = kc.data_ptr<float>();
    const float* vp = vc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t g_n = hq / hkv;
    const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
    at::parallel_for(0, b_n * hkv, 1, [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> scores;
        for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / hkv, h = task % hkv;
            const int64_t hi = len[b], lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0, n = hi - lo;
            scores.resize(g_n * n);
            const float* qh = qp + (b * hq + h * g_n) * d;
            std::vector<float> mx(g_n, -INFINITY), z(g_n, 0.f);
            for (int64_t j = lo; j < hi; ++j) {
                const int64_t row = (tab[b * tstride + j / bs] * bs + j % bs) * hkv + h;
                const float* kj = kp + row * d;
                for (int64_t g = 0; g < g_n; ++g) {
                    float s = sc * dot(qh + g * d, kj, d);
                    if (cap > 0.f) s = cap * std::tanh(s / cap);
                    scores[g * n + (j - lo)] = s;
                    mx[g] = std::max(mx[g], s);
                }
            }
            for (int64_t g = 0; g < g_n; ++g)
                for (int64_t j = 0; j < n; ++j) {
                    float& s = scores[g * n + j];
                    s = std::exp(s - mx[g]);
                    z[g] += s;
                }
            float* oh = op + (b * hq + h * g_n) * d;
            std::fill(oh, oh + g_n * d, 0.f);
            for (int64_t j = lo; j < hi; ++j) {
                const int64_t row = (tab[b * tstride + j / bs] * bs + j % bs) * hkv + h;
                const float* vj = vp + row * d;
                for (int64_t g = 0; g < g_n; ++g) axpy(oh + g * d, scores[g * n + (j - lo)], vj, d);
            }
            for (int64_t g = 0; g < g_n; ++g) {
                const float inv = 1.f / z[g];
                for (int64_t i = 0; i < d; ++i) oh[g * d + i] *= inv;
            }
        }
    });
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("paged_decode", &paged_decode, "decode attention over fp32 KV pages (paged_decode_cpu.py)");
}
