// AMX path of the integer-dot matmul (q8_dot_cpu.cpp): batches of activation rows times GGUF Q4_1 / Q8_0
// blocks through the tile unit's int8 dot products, where the host has AMX-TILE and AMX-INT8 (and the kernel
// was built with them: kernels/cpu_extension.py, amx flags) and Linux grants the process the tile state.
//
// The same activation codes and (dx, sx) as the vector paths (quantized by the caller), the same exact int32
// block sums, the float sums in another order:
//   C[n, m] (16 weight rows x 16 activation rows, int32) = one TDPBUSD (Q4_1: unsigned 4-bit codes times signed
//   activation codes) or TDPBSSD (Q8_0: signed times signed) per block of 32, K = 32;
//   acc[n] (16 float lanes over m) += cvt(C[n]) * (d[n, b] dx[b, m]) + m[n, b] sx[b, m]  (Q4_1's min term).
// Layout: A (weights, 16 rows x 32 bytes per block) is unpacked per panel of 16 weight rows into a
// thread-local buffer of 16 x K bytes (Q4_1 nibbles: low nibbles then high ones, element order; Q8_0 copied),
// with the panel's d and m converted to float32 [blocks, 16]. B (activations) is laid out once per call in the
// tile unit's 4-byte-interleaved form, 8 rows x 64 bytes per block and tile of 16 activation rows (rows past M
// zero), with dx and sx as [tiles, blocks, 16] vectors. Two blocks per step use two sets of tiles (C, A, B
// in tiles 0-2 and 3-5) so the second dot product overlaps the first one's scaling. Panels are split over
// torch's intra-op threads; each thread loads the tile configuration at the start of its range and releases
// the tiles at its end. Output rows are written as 16 x 16 transposes through a small buffer.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define Q8DOT_AMX 1
#else
#define Q8DOT_AMX 0
#endif

namespace {

constexpr int QK = 32;
constexpr int TN = 16;  // weight rows per panel (the C tile's rows)
constexpr int TM = 16;  // activation rows per tile (the C tile's columns)

#if Q8DOT_AMX
struct TileConfig {
    uint8_t palette_id = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// The process asks Linux once for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
// without it the first tile instruction would fault.
bool permitted() {
    static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return ok;
}

void load_config() {
    TileConfig c;
    for (int s = 0; s < 2; ++s) {
        c.rows[3 * s] = TN, c.colsb[3 * s] = TM * 4;          // C: 16 weight rows x 16 int32
        c.rows[3 * s + 1] = TN, c.colsb[3 * s + 1] = QK;      // A: 16 weight rows x 32 codes
        c.rows[3 * s + 2] = QK / 4, c.colsb[3 * s + 2] = TM * 4;  // B: 8 rows x (16 activation rows x 4 codes)
    }
    _tile_loadconfig(&c);
}

void* aligned(std::vector<uint8_t>& v, size_t bytes) {
    v.resize(bytes + 64);
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// Panel of weight rows n0..n0+rows (rows <= 16; the rest zero): codes into a [16, K] and (d, m) into two
// [blocks, 16] float arrays.
template <int KIND>
void unpack_panel(const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t n0, int rows, uint8_t* a, float* d,
                  float* mn) {
    const int64_t k = nb * QK;
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int n = 0; n < TN; ++n) {
        uint8_t* an = a + n * k;
        if (n >= rows) {
            std::memset(an, 0, k);
            for (int64_t b = 0; b < nb; ++b) d[b * TN + n] = 0.f, mn[b * TN + n] = 0.f;
            continue;
        }
        const uint8_t* row = w + (n0 + n) * row_bytes;
        for (int64_t b = 0; b < nb; ++b) {
            uint16_t h[2];
            if constexpr (KIND == 0) {
                const uint8_t* blk = row + b * 20;
                std::memcpy(h, blk, 4);
                const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(an + b * QK), _mm_and_si128(raw, low));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(an + b * QK + 16),
                                 _mm_and_si128(_mm_srli_epi16(raw, 4), low));
                d[b * TN + n] = _cvtsh_ss(h[0]);
                mn[b * TN + n] = _cvtsh_ss(h[1]);
            } else {
                const uint8_t* blk = row + b * 34;
                std::memcpy(h, blk, 2);
                std::memcpy(an + b * QK, blk + 2, QK);
                d[b * TN + n] = _cvtsh_ss(h[0]);
                mn[b * TN + n] = 0.f;
            }
        }
    }
}

// acc[n] += cvt(C[n]) * (d[n] dx) (+ m[n] sx for Q4_1) for the 16 rows of one stored C tile.
template <int KIND>
inline void scale_add(const int32_t* c, const float* d, const float* mn, __m512 dx, __m512 sx, __m512* acc) {
    for (int n = 0; n < TN; ++n) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + n * TM));
        acc[n] = _mm512_fmadd_ps(v, _mm512_mul_ps(_mm512_set1_ps(d[n]), dx), acc[n]);
        if constexpr (KIND == 0) acc[n] = _mm512_fmadd_ps(_mm512_set1_ps(mn[n]), sx, acc[n]);
    }
}

template <int KIND>
void run(const int8_t* bq, const float* dxv, const float* sxv, int64_t m, int64_t nb, const uint8_t* w,
         int64_t n, float* y) {
    const int64_t k = nb * QK, row_bytes = nb * (KIND == 0 ? 20 : 34);
    const int64_t tiles = (m + TM - 1) / TM, panels = (n + TN - 1) / TN;
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
        thread_local std::vector<uint8_t> abuf, sbuf;
        uint8_t* a = static_cast<uint8_t*>(aligned(abuf, TN * k));
        float* d = static_cast<float*>(aligned(sbuf, (2 * nb * TN + 2 * TN * TM + TN * TM) * sizeof(float)));
        float* mn = d + nb * TN;
        int32_t* c = reinterpret_cast<int32_t*>(mn + nb * TN);  // two stored C tiles
        float* out = reinterpret_cast<float*>(c + 2 * TN * TM);
        load_config();
        for (int64_t p = begin; p < end; ++p) {
            const int64_t n0 = p * TN;
            const int rows = static_cast<int>(std::min<int64_t>(TN, n - n0));
            unpack_panel<KIND>(w, row_bytes, nb, n0, rows, a, d, mn);
            // the next panel's weights (contiguous rows) are prefetched while this one computes, a share per block
            const char* next = reinterpret_cast<const char*>(w + (n0 + TN) * row_bytes);
            const int64_t lines = p + 1 < end ? (std::min<int64_t>(TN, n - n0 - TN) * row_bytes + 63) / 64 : 0;
            auto prefetch = [&](int64_t b0, int64_t b1) {
                for (int64_t l = b0 * lines / nb; l < b1 * lines / nb; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
            };
            for (int64_t t = 0; t < tiles; ++t) {
                __m512 acc[TN];
                for (int i = 0; i < TN; ++i) acc[i] = _mm512_setzero_ps();
                const int8_t* bt = bq + t * nb * (QK * TM);
                const float* dxt = dxv + t * nb * TM;
                const float* sxt = sxv + t * nb * TM;
                int64_t b = 0;
                for (; b + 2 <= nb; b += 2) {
                    if (t == 0) prefetch(b, b + 2);
                    _tile_zero(0);
                    _tile_zero(3);
                    _tile_loadd(1, a + b * QK, k);
                    _tile_loadd(2, bt + b * QK * TM, TM * 4);
                    _tile_loadd(4, a + (b + 1) * QK, k);
                    _tile_loadd(5, bt + (b + 1) * QK * TM, TM * 4);
                    if constexpr (KIND == 0) {
                        _tile_dpbusd(0, 1, 2);
                        _tile_dpbusd(3, 4, 5);
                    } else {
                        _tile_dpbssd(0, 1, 2);
                        _tile_dpbssd(3, 4, 5);
                    }
                    _tile_stored(0, c, TM * 4);
                    _tile_stored(3, c + TN * TM, TM * 4);
                    scale_add<KIND>(c, d + b * TN, mn + b * TN, _mm512_loadu_ps(dxt + b * TM),
                                    _mm512_loadu_ps(sxt + b * TM), acc);
                    scale_add<KIND>(c + TN * TM, d + (b + 1) * TN, mn + (b + 1) * TN,
                                    _mm512_loadu_ps(dxt + (b + 1) * TM), _mm512_loadu_ps(sxt + (b + 1) * TM), acc);
                }
                if (b < nb) {
                    if (t == 0) prefetch(b, nb);
                    _tile_zero(0);
                    _tile_loadd(1, a + b * QK, k);
                    _tile_loadd(2, bt + b * QK * TM, TM * 4);
                    if constexpr (KIND == 0) _tile_dpbusd(0, 1, 2);
                    else _tile_dpbssd(0, 1, 2);
                    _tile_stored(0, c, TM * 4);
                    scale_add<KIND>(c, d + b * TN, mn + b * TN, _mm512_loadu_ps(dxt + b * TM),
                                    _mm512_loadu_ps(sxt + b * TM), acc);
                }
                // acc[n] holds activation rows t*16 .. t*16+15 of weight row n0 + n: write y[m, n0 .. n0+rows)
                for (int i = 0; i < TN; ++i) _mm512_store_ps(out + i * TM, acc[i]);
                const int mrows = static_cast<int>(std::min<int64_t>(TM, m - t * TM));
                const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                         13, 14, 15), _mm512_set1_epi32(TM));
                const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1u);
                for (int r = 0; r < mrows; ++r) {
                    const __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32(r)), out, 4);
                    _mm512_mask_storeu_ps(y + (t * TM + r) * n + n0, keep, v);
                }
            }
        }
        _tile_release();
    });
}
#endif

}  // namespace

// Whether this build has the AMX path and the process may use the tile unit.
bool q8_dot_amx_ready() {
#if Q8DOT_AMX
    return permitted();
#else
    return false;
#endif
}

// y [M, N] from the caller's activation codes xq [M, K] and (dx, sx) [M, K/32, 2] and the weight blocks w
// ([N, K/32 * block_bytes]; kind 0: Q4_1, 1: Q8_0). False (y untouched) where the AMX path is not ready.
bool q8_dot_amx_mm(int kind, const int8_t* xq, const float* ds, int64_t m, int64_t k, const uint8_t* w, int64_t n,
                   float* y) {
#if Q8DOT_AMX
    if (!permitted()) return false;
    const int64_t nb = k / QK, tiles = (m + TM - 1) / TM;
    thread_local std::vector<uint8_t> bbuf, vbuf;
    int8_t* bq = static_cast<int8_t*>(aligned(bbuf, tiles * nb * QK * TM));
    float* dxv = static_cast<float*>(aligned(vbuf, 2 * tiles * nb * TM * sizeof(float)));
    float* sxv = dxv + tiles * nb * TM;
    std::memset(bq, 0, tiles * nb * QK * TM);
    std::memset(dxv, 0, 2 * tiles * nb * TM * sizeof(float));
    // B tile of (tile t, block b): row j (0..7) holds codes 4j..4j+3 of each activation row r of the tile
    for (int64_t r = 0; r < m; ++r) {
        const int64_t t = r / TM, rr = r % TM;
        for (int64_t b = 0; b < nb; ++b) {
            int8_t* dst = bq + (t * nb + b) * QK * TM + rr * 4;
            const int8_t* src = xq + r * k + b * QK;
            for (int j = 0; j < QK / 4; ++j) std::memcpy(dst + j * TM * 4, src + 4 * j, 4);
            dxv[(t * nb + b) * TM + rr] = ds[2 * (r * nb + b)];
            sxv[(t * nb + b) * TM + rr] = ds[2 * (r * nb + b) + 1];
        }
    }
    if (kind == 0) run<0>(bq, dxv, sxv, m, nb, w, n, y);
    else run<1>(bq, dxv, sxv, m, nb, w, n, y);
    return true;
#else
    (void)kind, (void)xq, (void)ds, (void)m, (void)k, (void)w, (void)n, (void)y;
    return false;
#endif
}
