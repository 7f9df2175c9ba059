// RMSNorm of float32 rows in one call (norm_cpu.py states the algorithm and its bound).
//
// Per row of D: s = sum x^2 over 8 partial sums (lane j takes the elements j, j + 8, ...; then the 8 lanes
// added pairwise: (0+4, 1+5, 2+6, 3+7), (0+2, 1+3), 0+1; a tail of D mod 8 elements added after),
// r = 1 / sqrt(s / D + eps), y = (x r) w. The AVX2 and the scalar builds add in that same order, so they
// agree bit for bit. Rows are split over torch's intra-op threads in chunks of at least GRAIN elements.
// ATen and pybind headers only (not torch/extension.h): the first build takes ~13 s instead of ~33 s
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NORM_AVX2 1
#else
#define NORM_AVX2 0
#endif

namespace {

constexpr int64_t GRAIN = 16384;  // elements per thread chunk: a decode step's rows stay on one thread

inline float sum_squares(const float* x, int64_t d) {
    const int64_t d8 = d / 8 * 8;
    float lanes[8];
#if NORM_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d8; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));  // no FMA: the scalar build rounds the product too
    }
    _mm256_storeu_ps(lanes, acc);
#else
    for (int j = 0; j < 8; ++j) lanes[j] = 0.f;
    for (int64_t i = 0; i < d8; i += 8)
        for (int j = 0; j < 8; ++j) lanes[j] += x[i + j] * x[i + j];
#endif
    for (int j = 0; j < 4; ++j) lanes[j] += lanes[j + 4];
    lanes[0] += lanes[2];
    lanes[1] += lanes[3];
    float s = lanes[0] + lanes[1];
    for (int64_t i = d8; i < d; ++i) s += x[i] * x[i];
    return s;
}

inline void scale_row(const float* x, const float* w, float r, float* y, int64_t d) {
    int64_t i = 0;
#if NORM_AVX2
    const __m256 rv = _mm256_set1_ps(r);
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
#endif
    for (; i < d; ++i) y[i] = (x[i] * r) * w[i];
}

}  // namespace

// y = x / sqrt(mean(x^2, -1) + eps) * w for float32 x [..., D] and w [D].
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps) {
    TORCH_CHECK(x.dtype() == at::kFloat && w.dtype() == at::kFloat, "x and w: float32 expected");
    TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0), "w [D] for x [..., D] expected, got x ",
                x.sizes(), " and w ", w.sizes());
    x = x.contiguous();
    w = w.contiguous();
    auto y = at::empty_like(x);
    const int64_t d = x.size(-1);
    const int64_t rows = d ? x.numel() / d : 0;
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const float e = static_cast<float>(eps);
    const float inv_d = 1.f / static_cast<float>(d);
    at::parallel_for(0, rows, std::max<int64_t>(1, GRAIN / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* xr = xp + r * d;
            const float inv = 1.f / std::sqrt(sum_squares(xr, d) * inv_d + e);
            scale_row(xr, wp, inv, yp + r * d, d);
        }
    });
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("rms_norm", &rms_norm, "RMSNorm of float32 rows (norm_cpu.py)");
}
