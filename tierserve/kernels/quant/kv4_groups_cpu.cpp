// kv4 pages gathered and dequantized in one pass (kv4_groups.py states the format and algorithm).
//
// Inputs, one of K or V of one layer: codes [NB, BS, H, D/2] uint8 (channel 2j in the low nibble of byte j,
// 2j+1 in the high one), scale and zero [NB, BS, H, D/g] fp16, pages int64 [n] (block ids, each < NB).
// Output float32 [n * BS, H, D]: x = zero + q * scale per group of g channels, the rows of page i at
// rows i*BS .. i*BS+BS-1. Rows (token, head) are split over torch's intra-op threads.
//
// AVX2, groups of a multiple of 32 channels: 16 code bytes give their low and high nibbles (and, shift, and),
// interleaved back into channel order by unpacklo/unpackhi_epi8; each 8 codes are widened to int32, converted
// and put through one FMA with the group's broadcast scale and zero. Other group sizes: the scalar loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KV4_AVX2 1
#else
#define KV4_AVX2 0
#endif

namespace {

inline float half_to_float(uint16_t h) {
#if KV4_AVX2
    return _cvtsh_ss(h);
#else
    return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// One (token, head) row: dim channels from dim/2 code bytes and dim/g (scale, zero) pairs.
inline void dequant_row(const uint8_t* q, const uint16_t* s, const uint16_t* z, float* out, int64_t dim,
                        int64_t g) {
    for (int64_t gi = 0; gi < dim / g; ++gi) {
        const float sc = half_to_float(s[gi]), zr = half_to_float(z[gi]);
        const uint8_t* qg = q + gi * g / 2;
        float* o = out + gi * g;
#if KV4_AVX2
        if (g % 32 == 0) {
            const __m256 vs = _mm256_set1_ps(sc), vz = _mm256_set1_ps(zr);
            const __m128i low4 = _mm_set1_epi8(0x0F);
            for (int64_t c = 0; c < g / 2; c += 16, o += 32) {
                const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + c));
                const __m128i lo = _mm_and_si128(b, low4);
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
                const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
                const __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
                for (int k = 0; k < 4; ++k) {
                    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k]));
                    _mm256_storeu_ps(o + 8 * k, _mm256_fmadd_ps(v, vs, vz));
                }
            }
            continue;
        }
#endif
        for (int64_t j = 0; j < g / 2; ++j) {
            o[2 * j] = zr + static_cast<float>(qg[j] & 15) * sc;
            o[2 * j + 1] = zr + static_cast<float>(qg[j] >> 4) * sc;
        }
    }
}

torch::Tensor kv4_gather(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, torch::Tensor pages,
                         int64_t group) {
    TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(),
                "codes must be contiguous uint8 [NB, BS, H, D/2]");
    TORCH_CHECK(scale.scalar_type() == torch::kHalf && zero.scalar_type() == torch::kHalf &&
                    scale.is_contiguous() && zero.is_contiguous(), "scale and zero must be contiguous fp16");
    TORCH_CHECK(pages.dim() == 1 && pages.scalar_type() == torch::kLong, "pages must be int64 [n]");
    const int64_t nb = codes.size(0), bs = codes.size(1), h = codes.size(2), dim = 2 * codes.size(3);
    TORCH_CHECK(group > 0 && group % 2 == 0 && dim % group == 0, "group must be even and divide head_dim");
    TORCH_CHECK(scale.sizes() == zero.sizes() && scale.dim() == 4 && scale.size(0) == nb &&
                    scale.size(1) == bs && scale.size(2) == h && scale.size(3) == dim / group,
                "scale and zero must be [NB, BS, H, D/g]");
    const int64_t n = pages.size(0);
    auto pg = pages.contiguous();
    const int64_t* ids = pg.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(0 <= ids[i] && ids[i] < nb, "page id ", ids[i], " out of range");
    auto out = torch::empty({n * bs, h, dim}, codes.options().dtype(torch::kFloat));
    const uint8_t* q = codes.data_ptr<uint8_t>();
    const uint16_t* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
    const uint16_t* z = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::Half>());
    float* o = out.data_ptr<float>();
    const int64_t per_page = bs * h, ng = dim / group;
    at::parallel_for(0, n * per_page, 256, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const int64_t src = ids[r / per_page] * per_page + r % per_page;  // (block, token, head) row
            dequant_row(q + src * dim / 2, s + src * ng, z + src * ng, o + r * dim, dim, group);
        }
    });
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("kv4_gather", &kv4_gather, "kv4 pages gathered and dequantized (kv4_groups.py)");
}
