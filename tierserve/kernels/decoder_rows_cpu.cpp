// The eager CPU decoder's row-wise glue in single C++ calls: RMSNorm, RoPE of q and k out of the fused QKV
// projection, and greedy sampling's argmax (decoder_rows_cpu.py states the algorithms and their bounds).
//
// Built with -ffp-contract=off (decoder_rows_cpu.py): a product followed by a sum is never fused into one
// FMA, so each value is rounded where the torch forms it replaces round it.
// ATen and pybind headers only (not torch/extension.h): the first build takes ~13 s instead of ~33 s.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <tuple>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ROWS_AVX2 1
#else
#define ROWS_AVX2 0
#endif

namespace {

constexpr int64_t GRAIN = 16384;  // elements per thread chunk: a decode step's rows stay on one thread

int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, GRAIN / std::max<int64_t>(row_elems, 1)); }

// ------------------------------------------------------------------ RMSNorm
// Per row of D: s = sum x^2 over 8 partial sums (lane j takes the elements j, j + 8, ...; then the 8 lanes
// added pairwise: (0+4, 1+5, 2+6, 3+7), (0+2, 1+3), 0+1; a tail of D mod 8 elements added after),
// r = 1 / sqrt(s / D + eps), y = (x r) w. The AVX2 and the scalar builds add in that same order.
inline float sum_squares(const float* x, int64_t d) {
    const int64_t d8 = d / 8 * 8;
    float lanes[8];
#if ROWS_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d8; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
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
#if ROWS_AVX2
    const __m256 rv = _mm256_set1_ps(r);
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
#endif
    for (; i < d; ++i) y[i] = (x[i] * r) * w[i];
}

// ------------------------------------------------------------------ RoPE
// out[i] = x[i] c[i] + x[(i + D/2) mod D] s[i], products rounded, then their sum: apply_rope_full's values.
inline void rotate(const float* x, const float* c, const float* s, float* out, int64_t d) {
    const int64_t h = d / 2;
    int64_t i = 0;
#if ROWS_AVX2
    for (; i + 8 <= h; i += 8) {  // both halves of 8 lanes at once
        const __m256 lo = _mm256_loadu_ps(x + i), hi = _mm256_loadu_ps(x + h + i);
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + i)),
                                                _mm256_mul_ps(hi, _mm256_loadu_ps(s + i))));
        _mm256_storeu_ps(out + h + i, _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + h + i)),
                                                    _mm256_mul_ps(lo, _mm256_loadu_ps(s + h + i))));
    }
#endif
    for (; i < h; ++i) {
        out[i] = x[i] * c[i] + x[h + i] * s[i];
        out[h + i] = x[h + i] * c[h + i] + x[i] * s[h + i];
    }
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
    at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* xr = xp + r * d;
            const float inv = 1.f / std::sqrt(sum_squares(xr, d) * inv_d + e);
            scale_row(xr, wp, inv, yp + r * d, d);
        }
    });
    return y;
}

// q [T, hq, D], k [T, hkv, D] (new, contiguous): the first hq + hkv heads of qkv [T, W] (W >= (hq + hkv) D;
// rows read in place where contiguous, else from a contiguous copy) rotated by cos_full / sin_signed [T, D] (rope.rope_tables: [cos, cos], [-sin, sin]).
std::tuple<at::Tensor, at::Tensor> rope_qk(at::Tensor qkv, at::Tensor cos_full, at::Tensor sin_signed, int64_t hq,
                                           int64_t hkv) {
    TORCH_CHECK(qkv.dtype() == at::kFloat && cos_full.dtype() == at::kFloat && sin_signed.dtype() == at::kFloat,
                "qkv, cos and sin: float32 expected");
    TORCH_CHECK(qkv.dim() == 2, "qkv: [T, W] expected, got ", qkv.sizes());
    if (qkv.stride(1) != 1) qkv = qkv.contiguous();  // rows read in place when they are contiguous
    const int64_t t = qkv.size(0), d = cos_full.size(-1);
    TORCH_CHECK(d % 2 == 0 && cos_full.numel() == t * d && sin_signed.numel() == t * d,
                "cos/sin: [T, D] (any unit dims) with even D expected for T=", t, ", got ", cos_full.sizes());
    TORCH_CHECK(hq > 0 && hkv > 0 && (hq + hkv) * d <= qkv.size(1), "qkv: ", (hq + hkv) * d, " columns for ", hq,
                " + ", hkv, " heads of ", d, " expected, got ", qkv.size(1));
    cos_full = cos_full.contiguous();
    sin_signed = sin_signed.contiguous();
    auto q = at::empty({t, hq, d}, qkv.options());
    auto k = at::empty({t, hkv, d}, qkv.options());
    const float* xp = qkv.data_ptr<float>();
    const float* cp = cos_full.data_ptr<float>();
    const float* sp = sin_signed.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    float* kp = k.data_ptr<float>();
    const int64_t ld = qkv.stride(0), heads = hq + hkv;
    at::parallel_for(0, t * heads, grain_rows(d), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            const int64_t tok = p / heads, head = p % heads;
            float* out = head < hq ? qp + (tok * hq + head) * d : kp + (tok * hkv + head - hq) * d;
            rotate(xp + tok * ld + head * d, cp + tok * d, sp + tok * d, out, d);
        }
    });
    return {q, k};
}

// ------------------------------------------------------------------ argmax
// Per row of N: the index of its first maximum, a NaN counting as the maximum (its first index), as
// torch.argmax. Pass 1: the maximum and whether a NaN occurs (8 lanes under AVX2); pass 2: the first index
// equal to it (or the first NaN).
int64_t argmax_row(const float* x, int64_t n) {
    float m = -INFINITY;
    bool nan = false;
    int64_t i = 0;
#if ROWS_AVX2
    __m256 vm = _mm256_set1_ps(-INFINITY), vn = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        vm = _mm256_max_ps(vm, v);
        vn = _mm256_or_ps(vn, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vm);
    for (float l : lanes) m = std::max(m, l);
    nan = _mm256_movemask_ps(vn) != 0;
#endif
    for (; i < n; ++i) {
        nan = nan || std::isnan(x[i]);
        m = std::max(m, x[i]);
    }
    for (int64_t j = 0; j < n; ++j)
        if (nan ? std::isnan(x[j]) : x[j] == m) return j;
    return 0;
}

// int64 [M]: the argmax of each row of x [M, N] (float32, N >= 1).
at::Tensor argmax_rows(at::Tensor x) {
    TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) >= 1, "x: float32 [M, N >= 1] expected, got ",
                x.sizes());
    if (x.stride(1) != 1) x = x.contiguous();
    const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
    auto out = at::empty({rows}, x.options().dtype(at::kLong));
    const float* xp = x.data_ptr<float>();
    int64_t* op = out.data_ptr<int64_t>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * ld, n);
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("argmax_rows", &argmax_rows, "first index of each float32 row's maximum (decoder_rows_cpu.py)");
    mod.def("rms_norm", &rms_norm, "RMSNorm of float32 rows (decoder_rows_cpu.py)");
    mod.def("rope_qk", &rope_qk, "RoPE of q and k out of the fused QKV projection (decoder_rows_cpu.py)");
}
