// int4 x bf16 for a few rows of activations (M <= 64 per call): the weights are dequantized in registers to bf16 and
// multiplied with AVX512-BF16 dot products (vdpbf16ps), fp32 accumulation.
//
// Numbers: each weight is (code - zero) * scale in float32 (the reference's arithmetic: exact subtraction, one
// rounding), rounded once to bf16 (nearest even), so the weights are exactly those of `cpu_bf16_cached`; x is
// taken in bf16. Only the summation order differs from a dense bf16 GEMM (vdpbf16ps adds two exact products per
// lane per step, in fp32; like every AVX512-BF16 unit it treats denormal inputs as zero).
//
// Layout: the stored one. packed uint8 (N, K/2), byte p of a row holding k = 2p (low nibble) and 2p + 1 (high);
// scales and zeros float32 (N, G) (zeros 8 for symmetric layers). The group size must be a multiple of 32.
// x: bf16 (M, K), permuted within each chunk of 64 k by `permute_chunks`.
//
// How: K is taken in chunks of 64 (32 code bytes per row; K must be a multiple of 64). A chunk becomes two vectors
// of 16 bf16 pairs (k even, k odd) in the order `lookup_chunk` produces them; x comes permuted to the same order
// (kernels/small_m.py, `permute_chunks`, once per call), so each vdpbf16ps multiplies matching pairs. Within a group
// the 16 possible weights of a row form a bf16 table, so a vector is one table lookup (vpermw) of its nibbles; a
// 32-entry table holds the groups of both halves of a chunk (groups of 32 differ there). Four output rows are
// dequantized a segment of K at a time into a buffer that stays in L1, and every tile of up to four rows of x runs
// its dot products against it; each (output, x row) pair accumulates 16 lanes, summed at the end.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define QAT_SMALL_M_AVX512 1
#else
#define QAT_SMALL_M_AVX512 0
#endif

constexpr int64_t kMaxRows = 64;  // rows of x per call (accumulators: 4 x 64 x 64 B = 16 KiB per thread)

#if QAT_SMALL_M_AVX512
namespace {

constexpr int kRowsN = 4;             // output rows dequantized together
constexpr int kRowsM = 4;             // rows of x per register tile (kRowsN x kRowsM accumulators)
constexpr int64_t kSegment = 16;      // vectors of 32 k per row per segment (even): 4 rows x 16 x 64 B = 4 KiB

// A 32-entry bf16 table: words 0..15 = (c - zero0) * scale0, words 16..31 = (c - zero1) * scale1, c = 0..15, each
// computed in fp32 and rounded once to bf16 (nearest even). Entry 16 h + c serves the codes of half h of a chunk.
inline __m512i weight_table(float scale0, float zero0, float scale1, float zero1) {
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 low = _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(zero0)), _mm512_set1_ps(scale0));
  const __m512 high = _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(zero1)), _mm512_set1_ps(scale1));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
}

// The 64 weights of one row in a chunk of 64 k (32 code bytes) as two vectors of bf16 pairs, in the chunk order
// of `permute_chunks` (kernels/small_m.py): the bytes widen to words (byte i -> word i, 128-bit lane i / 8),
// low and high nibbles interleave per 128-bit lane (unpacklo: bytes 8L..8L+3 of lane L; unpackhi: 8L+4..8L+7),
// and the table lookup (vpermw) maps each nibble, plus 16 for the chunk's second half (bytes 16..31), to bf16.
inline void lookup_chunk(const uint8_t* bytes, __m512i table, __m512i* out) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i nibble = _mm512_set1_epi16(0x0F);
  const __m512i half = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);  // words 16..31: +16
  constexpr int kAndOr = 0xEA;  // ternary logic (a & b) | c
  const __m512i low = _mm512_ternarylogic_epi32(words, nibble, half, kAndOr);
  const __m512i high = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), nibble, half, kAndOr);
  out[0] = _mm512_permutexvar_epi16(_mm512_unpacklo_epi16(low, high), table);
  out[1] = _mm512_permutexvar_epi16(_mm512_unpackhi_epi16(low, high), table);
}

// acc[n][r] (16 lanes each, in memory) += weights[n][v] . x[r][v] over the segment's vectors.
template <int NB, int MT>
inline void dot_tile(const __m512i (*weights)[kSegment], int64_t vectors, const uint16_t* x, int64_t k,
                     int64_t first_k, float (*acc)[kMaxRows][16]) {
  __m512 sum[NB][MT];
  for (int n = 0; n < NB; ++n)
    for (int r = 0; r < MT; ++r) sum[n][r] = _mm512_loadu_ps(acc[n][r]);
  for (int64_t v = 0; v < vectors; ++v) {
    __m512bh xs[MT];
    for (int r = 0; r < MT; ++r) xs[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + r * k + first_k + 32 * v));
    for (int n = 0; n < NB; ++n) {
      const __m512bh w = reinterpret_cast<__m512bh>(weights[n][v]);
      for (int r = 0; r < MT; ++r) sum[n][r] = _mm512_dpbf16_ps(sum[n][r], w, xs[r]);
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int r = 0; r < MT; ++r) _mm512_storeu_ps(acc[n][r], sum[n][r]);
}

template <int NB>
inline void dot_rows(const __m512i (*weights)[kSegment], int64_t vectors, const uint16_t* x, int64_t rows, int64_t k,
                     int64_t first_k, float (*acc)[kMaxRows][16]) {
  int64_t r = 0;
  for (; r + kRowsM <= rows; r += kRowsM) {
    float (*tile)[kMaxRows][16] = reinterpret_cast<float (*)[kMaxRows][16]>(&acc[0][r][0]);
    dot_tile<NB, kRowsM>(weights, vectors, x + r * k, k, first_k, tile);
  }
  float (*tile)[kMaxRows][16] = reinterpret_cast<float (*)[kMaxRows][16]>(&acc[0][r][0]);
  switch (rows - r) {
    case 1: dot_tile<NB, 1>(weights, vectors, x + r * k, k, first_k, tile); break;
    case 2: dot_tile<NB, 2>(weights, vectors, x + r * k, k, first_k, tile); break;
    case 3: dot_tile<NB, 3>(weights, vectors, x + r * k, k, first_k, tile); break;
    default: break;
  }
}

// Outputs n0 .. n0 + NB - 1 for every row of x.
template <int NB>
void block(const uint8_t* packed, const float* scales, const float* zeros, const uint16_t* x, int64_t rows, int64_t k,
           int64_t group_size, int64_t n0, float* out, int64_t out_stride) {
  alignas(64) __m512i weights[kRowsN][kSegment];
  alignas(64) float acc[kRowsN][kMaxRows][16];
  for (int n = 0; n < NB; ++n) std::fill(&acc[n][0][0], &acc[n][0][0] + rows * 16, 0.0f);  // the rows in use only
  const int64_t groups = k / group_size, vectors_per_group = group_size / 32, total = k / 32;  // total is even
  for (int64_t first = 0; first < total; first += kSegment) {
    const int64_t vectors = std::min(kSegment, total - first);
    for (int n = 0; n < NB; ++n) {
      const uint8_t* row = packed + (n0 + n) * (k / 2);
      const float* row_scales = scales + (n0 + n) * groups;
      const float* row_zeros = zeros + (n0 + n) * groups;
      int64_t groups_now[2] = {-1, -1};
      __m512i table = _mm512_setzero_si512();
      for (int64_t v = 0; v < vectors; v += 2) {  // a chunk of 64 k: vectors v, v + 1
        const int64_t g0 = (first + v) / vectors_per_group, g1 = (first + v + 1) / vectors_per_group;
        if (g0 != groups_now[0] || g1 != groups_now[1]) {
          table = weight_table(row_scales[g0], row_zeros[g0], row_scales[g1], row_zeros[g1]);
          groups_now[0] = g0;
          groups_now[1] = g1;
        }
        lookup_chunk(row + 16 * (first + v), table, &weights[n][v]);
      }
    }
    dot_rows<NB>(weights, vectors, x, rows, k, 32 * first, acc);
  }
  for (int n = 0; n < NB; ++n)
    for (int64_t r = 0; r < rows; ++r) out[r * out_stride + n0 + n] = _mm512_reduce_add_ps(_mm512_load_ps(acc[n][r]));
}

void run(const uint8_t* packed, const float* scales, const float* zeros, const uint16_t* x, int64_t rows, int64_t n,
         int64_t k, int64_t group_size, float* out) {
  const int64_t blocks = (n + kRowsN - 1) / kRowsN;
  at::parallel_for(0, blocks, 8, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t n0 = b * kRowsN;
      switch (std::min<int64_t>(kRowsN, n - n0)) {
        case 4: block<4>(packed, scales, zeros, x, rows, k, group_size, n0, out, n); break;
        case 3: block<3>(packed, scales, zeros, x, rows, k, group_size, n0, out, n); break;
        case 2: block<2>(packed, scales, zeros, x, rows, k, group_size, n0, out, n); break;
        default: block<1>(packed, scales, zeros, x, rows, k, group_size, n0, out, n); break;
      }
    }
  });
}

}  // namespace
#endif

bool small_m_available() { return QAT_SMALL_M_AVX512; }

// x bf16 (M, K) contiguous, 1 <= M <= 64; packed uint8 (N, K/2); scales, zeros float32 (N, G). Returns float32 (M, N).
at::Tensor small_m_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(QAT_SMALL_M_AVX512, "small_m_bf16 needs a build with AVX-512 F/BW/BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2, "x must be contiguous bf16 (M, K)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2,
              "packed must be contiguous uint8 (N, K/2)");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(packed.size(1) * 2 == k, "packed holds K = ", packed.size(1) * 2, ", x has K = ", k);
  TORCH_CHECK(group_size % 32 == 0 && k % group_size == 0, "group_size must be a multiple of 32 dividing K, got ",
              group_size);
  TORCH_CHECK(k % 64 == 0, "K must be a multiple of 64, got ", k);
  for (const at::Tensor* t : {&scales, &zeros}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                    t->size(1) == k / group_size,
                "scales and zeros must be contiguous float32 (N, G)");
  }
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "small_m_bf16 takes 1 to ", kMaxRows, " rows, got ", m);
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
#if QAT_SMALL_M_AVX512
  run(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(),
      reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), m, n, k, group_size, out.data_ptr<float>());
#endif
  return out;
}
