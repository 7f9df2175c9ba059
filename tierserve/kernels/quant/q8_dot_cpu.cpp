// Integer-dot matmul of GGUF Q4_1 / Q8_0 weight blocks with Q8 activations (q8_dot_cpu.py states the algorithm).
//
// Weights stay in their GGUF blocks, one row of N after the other ([N, K/32] blocks):
//   Q4_1: fp16 d, fp16 m, 16 bytes: element j (< 16) in the low nibble of byte j, element j + 16 in its high
//         nibble; w = d q + m, q in 0..15.                                      (20 bytes per 32 weights)
//   Q8_0: fp16 d, 32 int8 q; w = d q.                                           (34 bytes per 32 weights)
// Activations x [M, K] float32 are quantized per row and block of 32: dx = max|x| / 127,
// xq = sign(v) floor(|v| + 1/2) for v = x (1 / dx), in -127..127, sx = dx * sum(xq).
// Block dot: Q4_1: d dx sum(q xq) + m sx;  Q8_0: d dx sum(q xq). The integer sums are exact (int32);
// each block's product is added to a float32 accumulator (8 lanes under AVX2, one otherwise).
//
// AVX2 inner loop, per weight block: (d, m) converted together (one 4-byte load, one vcvtph2ps) and multiplied
// by the activation block's (dx, sx) in one 2-lane product: lane 0 is the block's scale d dx, lane 1 its min
// term m sx, summed in a vector beside the accumulator; the 16 nibble bytes are broadcast to both 128-bit
// lanes and the high lane shifted by 4 (vpsrlvd) before masking. Tiles: WR weight rows x R activation rows
// share each load (R 4 for batches, remainders 1-3; WR 2 for Q4_1 at one row); one row's blocks alternate
// between two accumulators to break the FMA dependency chain; the weight stream is prefetched PREFETCH bytes
// ahead of each row's position.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define Q8DOT_AVX2 1
#else
#define Q8DOT_AVX2 0
#endif
// VNNI (cpu_extension.py, vnni_flags): one vpdpbusd gives the int32 sums of maddubs then madd with ones (no pair
// can saturate: |sum| <= 2 * 128 * 127); Q8_0 only (the head 1.2-1.5x at M=32, Q4_1 0.7x: benchmarks/q8_dot.py).
// AVX512 (F, BW): batches of Q4_1 take two blocks per 512-bit register (tile512): per row and block pair one
// 64-code load, maddubs and madd, one conversion, one FMA with block b's d dx in lanes 0-7 and b+1's in 8-15;
// the same int32 block sums as the 256-bit tile, the float sums in another order.
#if Q8DOT_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__)
#define Q8DOT_AVX512 1
#else
#define Q8DOT_AVX512 0
#endif
#if Q8DOT_AVX2 && defined(__AVXVNNI__)
#define Q8DOT_DPBUSD(u, s) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (u), (s))
#elif Q8DOT_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q8DOT_DPBUSD(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#endif

bool q8_dot_amx_ready();  // q8_dot_amx.cpp: batches on the AMX tile unit where built and permitted
bool q8_dot_amx_mm(int kind, const int8_t* xq, const float* ds, int64_t m, int64_t k, const uint8_t* w, int64_t n,
                   float* y);

namespace {

constexpr int QK = 32;
constexpr int AMX_MIN_ROWS = 5;  // rows from which AMX runs (benchmarks/q8_dot.py --pass: at 4 the vector tiles win)
constexpr int BLOCK_BYTES[2] = {20, 34};  // kind 0: Q4_1, kind 1: Q8_0
constexpr int ROWS = 4;                    // activation rows per tile
constexpr int PREFETCH = 4096;             // bytes ahead in the weight stream (4 KiB: 1.17x over none, 1 thread)

inline float half_to_float(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
#if Q8DOT_AVX2
    return _cvtsh_ss(h);
#else
    return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// Quantized activations: codes [M, K], then (dx, sx) per row and block [M, K/32, 2] (one 8-byte load).
struct QAct {
    int64_t k = 0, nb = 0;
    const int8_t* q = nullptr;
    const float* ds = nullptr;
};

void quantize_block(const float* xb, int8_t* q, float* ds) {
#if Q8DOT_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.f;
    const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m256 half = _mm256_set1_ps(0.5f);
    __m256i iv[4];
    for (int i = 0; i < 4; ++i) {
        const __m256 t = _mm256_mul_ps(v[i], id);
        const __m256 r = _mm256_floor_ps(_mm256_add_ps(_mm256_andnot_ps(sign, t), half));
        iv[i] = _mm256_cvtps_epi32(_mm256_or_ps(r, _mm256_and_ps(sign, t)));
    }
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    // pack to int8: packs interleave the 128-bit lanes; the permutation restores element order
    const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    ds[0] = d;
    ds[1] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
#else
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
        const float t = xb[j] * id;
        const int v = static_cast<int>(std::copysign(std::floor(std::fabs(t) + 0.5f), t));
        q[j] = static_cast<int8_t>(v);
        sum += v;
    }
    ds[0] = d;
    ds[1] = d * static_cast<float>(sum);
#endif
}

// Quantizes x [M, K] into ``buf`` (kept by the calling thread between calls: no allocation per call).
QAct quantize(const float* x, int64_t m, int64_t k, std::vector<uint8_t>& buf) {
    QAct a;
    a.k = k;
    a.nb = k / QK;
    const size_t qbytes = (m * k + 63) / 64 * 64;
    buf.resize(qbytes + 2 * sizeof(float) * m * a.nb + 64);
    uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    int8_t* q = reinterpret_cast<int8_t*>(base);
    float* ds = reinterpret_cast<float*>(base + qbytes);
    for (int64_t r = 0; r < m; ++r)
        for (int64_t b = 0; b < a.nb; ++b) quantize_block(x + r * k + b * QK, q + r * k + b * QK, ds + 2 * (r * a.nb + b));
    a.q = q;
    a.ds = ds;
    return a;
}

#if Q8DOT_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline int32_t load_i32(const uint8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}
#endif

// Weight rows w[0..WR) (``row_bytes`` apart) times activation rows r0..r0+R of ``a``: out[r * ldo + i] for
// activation row r0 + r and weight row i.
template <int KIND, int WR, int R>
void tile(const uint8_t* w, int64_t row_bytes, const QAct& a, int64_t r0, float* out, int64_t ldo) {
    const int64_t nb = a.nb;
    constexpr int64_t BB = BLOCK_BYTES[KIND];
#if Q8DOT_AVX2
    constexpr int U = (WR * R >= 4) ? 1 : 2;  // accumulators per (weight row, activation row)
    __m256 acc[WR][R][U];
    __m128 mins[WR][R];  // lane 1: the sum of m sx (Q4_1)
    for (int i = 0; i < WR; ++i)
        for (int r = 0; r < R; ++r) {
            for (int u = 0; u < U; ++u) acc[i][r][u] = _mm256_setzero_ps();
            mins[i][r] = _mm_setzero_ps();
        }
    const int8_t* xq0 = a.q + r0 * a.k;
    const float* ds0 = a.ds + 2 * r0 * nb;
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    const __m256i low = _mm256_set1_epi8(0x0F);
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // madd of int16 pairs (no VNNI)
    for (int64_t b0 = 0; b0 < nb; b0 += U) {
        for (int i = 0; i < WR; ++i)
            _mm_prefetch(reinterpret_cast<const char*>(w + i * row_bytes + b0 * BB + PREFETCH), _MM_HINT_T0);
        for (int u = 0; u < U && b0 + u < nb; ++u) {
            const int64_t b = b0 + u;
            for (int i = 0; i < WR; ++i) {
                const uint8_t* blk = w + i * row_bytes + b * BB;
                const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(load_i32(blk)));  // (d, m); Q8_0: d in lane 0
                __m256i wq;
                if constexpr (KIND == 0) {
                    const __m256i raw =
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)));
                    wq = _mm256_and_si256(_mm256_srlv_epi32(raw, shift), low);
                } else {
                    wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
                }
                for (int r = 0; r < R; ++r) {
                    const __m256i xq =
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq0 + r * a.k + b * QK));
                    const __m128 sc = _mm_mul_ps(dm, _mm_castsi128_ps(_mm_loadl_epi64(
                        reinterpret_cast<const __m128i*>(ds0 + 2 * (r * nb + b)))));  // (d dx, m sx)
                    __m256i p;
                    if constexpr (KIND == 0) {
                        p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), ones);
                        mins[i][r] = _mm_add_ps(mins[i][r], sc);
                    } else {  // unsigned x signed: |q| against xq with q's sign
#ifdef Q8DOT_DPBUSD
                        p = Q8DOT_DPBUSD(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
#else
                        p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq)),
                                              ones);
#endif
                    }
                    acc[i][r][u] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sc), _mm256_cvtepi32_ps(p), acc[i][r][u]);
                }
            }
        }
    }
    for (int i = 0; i < WR; ++i)
        for (int r = 0; r < R; ++r) {
            __m256 t = acc[i][r][0];
            for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[i][r][u]);
            const float mterm = KIND == 0 ? _mm_cvtss_f32(_mm_movehdup_ps(mins[i][r])) : 0.f;
            out[r * ldo + i] = hsum(t) + mterm;
        }
#else
    for (int i = 0; i < WR; ++i)
        for (int r = 0; r < R; ++r) {
            const int8_t* xq = a.q + (r0 + r) * a.k;
            const float* ds = a.ds + 2 * (r0 + r) * nb;
            float acc = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* blk = w + i * row_bytes + b * BB;
                int sum = 0;
                if constexpr (KIND == 0) {
                    for (int j = 0; j < 16; ++j)
                        sum += (blk[4 + j] & 0x0F) * xq[b * QK + j] + (blk[4 + j] >> 4) * xq[b * QK + j + 16];
                } else {
                    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
                    for (int j = 0; j < QK; ++j) sum += q[j] * xq[b * QK + j];
                }
                acc += half_to_float(blk) * ds[2 * b] * static_cast<float>(sum);
                if constexpr (KIND == 0) acc += half_to_float(blk + 2) * ds[2 * b + 1];
            }
            out[r * ldo + i] = acc;
        }
#endif
}

#if Q8DOT_AVX512
// One Q4_1 weight row times activation rows r0..r0+R of ``a`` (R >= 2), two blocks per step (header above); an
// odd last block goes through the 256-bit formula.
template <int R>
void tile512_q4_1(const uint8_t* w, const QAct& a, int64_t r0, float* out, int64_t ldo) {
    const int64_t nb = a.nb;
    constexpr int64_t BB = BLOCK_BYTES[0];
    __m512 acc[R];
    __m128 mins[R];  // lanes 1 and 3: the sums of m sx of the even and the odd blocks
    for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_setzero_ps();
        mins[r] = _mm_setzero_ps();
    }
    const int8_t* xq0 = a.q + r0 * a.k;
    const float* ds0 = a.ds + 2 * r0 * nb;
    const __m512i shift = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i ones = _mm512_set1_epi16(1);
    const __m512i dup = _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3);  // each block's 16 bytes into two lanes
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);  // d dx of b, b+1
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const uint8_t* blk = w + b * BB;
        _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH), _MM_HINT_T0);
        const __m128 dm = _mm_cvtph_ps(_mm_unpacklo_epi32(_mm_cvtsi32_si128(load_i32(blk)),
                                                          _mm_cvtsi32_si128(load_i32(blk + BB))));  // d0 m0 d1 m1
        const __m256i two = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(blk + BB + 4),
                                                reinterpret_cast<const __m128i*>(blk + 4));
        const __m512i raw = _mm512_permutexvar_epi64(dup, _mm512_castsi256_si512(two));
        const __m512i wq = _mm512_and_si512(_mm512_srlv_epi32(raw, shift), low);
        for (int r = 0; r < R; ++r) {
            const __m512i xq = _mm512_loadu_si512(xq0 + r * a.k + b * QK);  // blocks b and b + 1
            const __m128 sc = _mm_mul_ps(dm, _mm_loadu_ps(ds0 + 2 * (r * nb + b)));  // d0dx0 m0sx0 d1dx1 m1sx1
            mins[r] = _mm_add_ps(mins[r], sc);
            const __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(wq, xq), ones);
            acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick, _mm512_castps128_ps512(sc)), _mm512_cvtepi32_ps(p),
                                     acc[r]);
        }
    }
    float tail[R] = {};
    if (b < nb) {  // the last block of an odd count
        const uint8_t* blk = w + b * BB;
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(load_i32(blk)));
        const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)));
        const __m256i wq = _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                            _mm256_set1_epi8(0x0F));
        for (int r = 0; r < R; ++r) {
            const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq0 + r * a.k + b * QK));
            const __m128 sc = _mm_mul_ps(dm, _mm_castsi128_ps(_mm_loadl_epi64(
                reinterpret_cast<const __m128i*>(ds0 + 2 * (r * nb + b)))));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), _mm256_set1_epi16(1));
            tail[r] = _mm_cvtss_f32(sc) * hsum(_mm256_cvtepi32_ps(p)) + _mm_cvtss_f32(_mm_movehdup_ps(sc));
        }
    }
    for (int r = 0; r < R; ++r) {
        const __m128 m = _mm_movehdup_ps(mins[r]);  // lanes 0 and 2: m sx of the even and the odd blocks
        out[r * ldo] = _mm512_reduce_add_ps(acc[r]) + (_mm_cvtss_f32(m) + _mm_cvtss_f32(_mm_movehl_ps(m, m))) +
                       tail[r];
    }
}
#endif

template <int KIND, int WR>
void rows_times_all(const uint8_t* w, int64_t row_bytes, const QAct& a, int64_t m, float* out, int64_t n) {
    int64_t r = 0;
#if Q8DOT_AVX512
    if constexpr (KIND == 0 && WR == 1) {  // batches of Q4_1: two blocks per 512-bit step
        if (m > 1) {
            for (; r + ROWS <= m; r += ROWS) tile512_q4_1<ROWS>(w, a, r, out + r * n, n);
            switch (m - r) {
                case 3: tile512_q4_1<3>(w, a, r, out + r * n, n); break;
                case 2: tile512_q4_1<2>(w, a, r, out + r * n, n); break;
                case 1: tile512_q4_1<1>(w, a, r, out + r * n, n); break;
                default: break;
            }
            return;
        }
    }
#endif
    for (; r + ROWS <= m; r += ROWS) tile<KIND, WR, ROWS>(w, row_bytes, a, r, out + r * n, n);
    switch (m - r) {
        case 3: tile<KIND, WR, 3>(w, row_bytes, a, r, out + r * n, n); break;
        case 2: tile<KIND, WR, 2>(w, row_bytes, a, r, out + r * n, n); break;
        case 1: tile<KIND, WR, 1>(w, row_bytes, a, r, out + r * n, n); break;
        default: break;
    }
}

template <int KIND>
void run(const QAct& a, int64_t m, const uint8_t* wp, int64_t n, float* yp) {
    const int64_t row_bytes = a.nb * BLOCK_BYTES[KIND];
    // two Q4_1 weight rows per tile at one activation row (1.1x; Q8_0's longer rows measured slower so)
    constexpr int WR = KIND == 0 ? 2 : 1;
    if (m == 1 && WR > 1) {
        at::parallel_for(0, (n + WR - 1) / WR, 8, [&](int64_t begin, int64_t end) {
            for (int64_t p = begin; p < end; ++p) {
                const int64_t j = p * WR;
                if (j + WR <= n) rows_times_all<KIND, WR>(wp + j * row_bytes, row_bytes, a, m, yp + j, n);
                else rows_times_all<KIND, 1>(wp + j * row_bytes, row_bytes, a, m, yp + j, n);
            }
        });
        return;
    }
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) rows_times_all<KIND, 1>(wp + j * row_bytes, row_bytes, a, m, yp + j, n);
    });
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
    const int64_t bb = BLOCK_BYTES[kind];
    TORCH_CHECK(k % QK == 0, "K must be a multiple of 32, got ", k);
    TORCH_CHECK(blocks.size(1) == k / QK * bb, "blocks: ", k / QK * bb, " bytes per row expected for K=", k,
                ", got ", blocks.size(1));
    auto y = torch::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    thread_local std::vector<uint8_t> buf;
    const QAct a = quantize(x.data_ptr<float>(), m, k, buf);
    if (m >= AMX_MIN_ROWS &&
        q8_dot_amx_mm(static_cast<int>(kind), a.q, a.ds, m, k, blocks.data_ptr<uint8_t>(), n, y.data_ptr<float>()))
        return y;
    if (kind == 0) run<0>(a, m, blocks.data_ptr<uint8_t>(), n, y.data_ptr<float>());
    else run<1>(a, m, blocks.data_ptr<uint8_t>(), n, y.data_ptr<float>());
    return y;
}

bool q8_dot_simd() { return Q8DOT_AVX2; }
bool q8_dot_avx512() { return Q8DOT_AVX512; }
#ifdef Q8DOT_DPBUSD
bool q8_dot_vnni() { return true; }
#else
bool q8_dot_vnni() { return false; }
#endif

// The op ``tierserve::q8_dot_mm`` in torch's C++ dispatcher (shape function registered from Python): a call from
// an eager module or a compiled graph's wrapper costs ~2 us of dispatch, ~17 us through a Python custom op.
TORCH_LIBRARY_FRAGMENT(tierserve, m) { m.def("q8_dot_mm(Tensor x, Tensor blocks, int kind) -> Tensor"); }
TORCH_LIBRARY_IMPL(tierserve, CPU, m) { m.impl("q8_dot_mm", &q8_dot_mm); }
// no gradient (inference only): autograd passes straight through instead of its not-implemented fallback
TORCH_LIBRARY_IMPL(tierserve, AutogradCPU, m) { m.impl("q8_dot_mm", torch::CppFunction::makeFallthrough()); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("q8_dot_mm", &q8_dot_mm, "GGUF Q4_1 / Q8_0 blocks times Q8 activations (q8_dot_cpu.py)");
    mod.def("simd", &q8_dot_simd, "whether the AVX2 path was compiled in");
    mod.def("vnni", &q8_dot_vnni, "whether its integer dots use VNNI's vpdpbusd");
    mod.def("avx512", &q8_dot_avx512, "whether batches of Q4_1 run the 512-bit tile");
    mod.def("amx", &q8_dot_amx_ready, "whether batches run on the AMX tile unit (q8_dot_amx.cpp)");
}
