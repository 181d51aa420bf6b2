// int4 x bf16 for a few rows of activations (M <= 16): the weight is dequantized in registers to bf16 pairs and
// multiplied with AVX512-BF16 dot products (vdpbf16ps), fp32 accumulation.
//
// Numbers: each weight is (code - zero) * scale in float32 (the reference's arithmetic, exact subtraction, one
// rounding), rounded once to bf16 (nearest even), so the weights are exactly those of `cpu_bf16_cached`; x is
// taken in bf16. Only the summation order differs from a dense bf16 GEMM (vdpbf16ps adds two exact products per
// lane per step, in fp32; like every AVX512-BF16 unit it treats denormal inputs as zero).
//
// Layout (the "tiles16" form, made once per layer by `small_m_form` in kernels/small_m.py):
//   codes   uint8 (N/16, K/2, 16): codes[b, p, i] = packed[16 b + i, p] (byte p of a row holds k = 2p, 2p + 1)
//   scales  float32 (N/16, G, 16): scales[b, g, i] = scale of row 16 b + i, group g
//   zeros   float32 (N/16, G, 16): the same for the zero points (8 for symmetric layers)
// N is padded to a multiple of 16 with zero-scale rows (their outputs are dropped by the caller).
//
// Lanes are 16 output rows n; each 32-bit lane of a weight vector holds the bf16 pair (k even, k odd), and the
// matching x pair is broadcast from memory, so one vdpbf16ps advances 16 outputs by two k.

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

#if QAT_SMALL_M_AVX512
namespace {

// Interleave two 16-value bf16 halves (a = even k, b = odd k) into 16 pairs (a_i, b_i): vpermw index table.
inline __m512i pair_index() {
  alignas(64) static const int16_t index[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8,  24, 9,  25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(index);
}

constexpr int64_t kSegmentPairs = 64;  // k pairs dequantized at a time: 64 x 64 bytes = 4 KiB, stays in L1
constexpr int kRowTile = 8;            // rows of x per register tile (8 accumulators; 16 spill)

// `count` pairs of k from one group (one scale and zero per lane) into bf16 pair vectors.
inline void dequantize_segment(const uint8_t* codes, int64_t count, __m512 scale, __m512 zero, __m512i* out) {
  const __m512i index = pair_index();
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  for (int64_t q = 0; q < count; ++q) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + q * 16)));
    // (code - zero) * scale: exact subtraction of small integers, one rounding, as the reference
    const __m512 even = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, nibble)), zero), scale);
    const __m512 odd = _mm512_mul_ps(
        _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(bytes, 4), nibble)), zero), scale);
    // cvtne2ps: low 16 bf16 from `even`, high 16 from `odd` (round to nearest even); the permutation pairs them
    out[q] = _mm512_permutexvar_epi16(index, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even)));
  }
}

// acc[r] (16 lanes, in memory) += the segment's weights . x pairs, for ROWS rows of x.
template <int ROWS>
inline void dot_segment(const __m512i* weights, int64_t count, const uint16_t* x, int64_t k, int64_t first_pair,
                        float* acc) {
  __m512 sum[ROWS];
  for (int r = 0; r < ROWS; ++r) sum[r] = _mm512_loadu_ps(acc + r * 16);
  for (int64_t q = 0; q < count; ++q) {
    const __m512bh w = reinterpret_cast<__m512bh>(weights[q]);
    for (int r = 0; r < ROWS; ++r) {
      int32_t x_pair;
      __builtin_memcpy(&x_pair, x + r * k + 2 * (first_pair + q), sizeof x_pair);
      sum[r] = _mm512_dpbf16_ps(sum[r], w, reinterpret_cast<__m512bh>(_mm512_set1_epi32(x_pair)));
    }
  }
  for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(acc + r * 16, sum[r]);
}

inline void dot_rows(const __m512i* weights, int64_t count, const uint16_t* x, int64_t k, int64_t first_pair,
                     int64_t rows, float* acc) {
  int64_t r = 0;
  for (; r + kRowTile <= rows; r += kRowTile) {
    dot_segment<kRowTile>(weights, count, x + r * k, k, first_pair, acc + r * 16);
  }
  switch (rows - r) {
#define QAT_TAIL(R) \
  case R:           \
    dot_segment<R>(weights, count, x + r * k, k, first_pair, acc + r * 16); \
    break;
    QAT_TAIL(1) QAT_TAIL(2) QAT_TAIL(3) QAT_TAIL(4) QAT_TAIL(5) QAT_TAIL(6) QAT_TAIL(7)
#undef QAT_TAIL
    default:
      break;
  }
}

// Output rows 16 b .. 16 b + 15 for every row of x (rows <= 16): the weights are dequantized once, a segment at
// a time, and reused from L1 by every row tile.
void block_rows(const uint8_t* codes, const float* scales, const float* zeros, const uint16_t* x, int64_t rows,
                int64_t k, int64_t groups, int64_t group_size, float* out, int64_t out_stride) {
  alignas(64) __m512i weights[kSegmentPairs];
  alignas(64) float acc[16 * 16] = {};
  const int64_t pairs_per_group = group_size / 2;
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 scale = _mm512_loadu_ps(scales + g * 16);
    const __m512 zero = _mm512_loadu_ps(zeros + g * 16);
    for (int64_t q = 0; q < pairs_per_group; q += kSegmentPairs) {
      const int64_t first = g * pairs_per_group + q;
      const int64_t count = std::min(kSegmentPairs, pairs_per_group - q);
      dequantize_segment(codes + first * 16, count, scale, zero, weights);
      dot_rows(weights, count, x, k, first, rows, acc);
    }
  }
  for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(out + r * out_stride, _mm512_loadu_ps(acc + r * 16));
}

void run_rows(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, const uint16_t* x,
              int64_t rows, int64_t k, int64_t group_size, float* out, int64_t n_padded) {
  const int64_t blocks = codes.size(0), groups = scales.size(1);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const float* z = zeros.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      block_rows(c + b * (k / 2) * 16, s + b * groups * 16, z + b * groups * 16, x, rows, k, groups, group_size,
                 out + b * 16, n_padded);
    }
  });
}

}  // namespace
#endif

bool small_m_available() { return QAT_SMALL_M_AVX512; }

// x bf16 (M, K) contiguous, M <= 16; returns float32 (M, N_padded).
at::Tensor small_m_bf16(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(QAT_SMALL_M_AVX512, "small_m_bf16 needs a build with AVX-512 F/BW/BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2, "x must be contiguous bf16 (M, K)");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3 && codes.size(2) == 16,
              "codes must be contiguous uint8 (N/16, K/2, 16)");
  const int64_t m = x.size(0), k = x.size(1), blocks = codes.size(0);
  TORCH_CHECK(codes.size(1) * 2 == k, "codes hold K = ", codes.size(1) * 2, ", x has K = ", k);
  TORCH_CHECK(group_size % 2 == 0 && k % group_size == 0, "group_size must be even and divide K");
  for (const at::Tensor* t : {&scales, &zeros}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == blocks &&
                    t->size(1) == k / group_size && t->size(2) == 16,
                "scales and zeros must be contiguous float32 (N/16, G, 16)");
  }
  TORCH_CHECK(m >= 1 && m <= 16, "small_m_bf16 takes 1 to 16 rows, got ", m);
  const int64_t n_padded = blocks * 16;
  at::Tensor out = at::empty({m, n_padded}, x.options().dtype(at::kFloat));
#if QAT_SMALL_M_AVX512
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  run_rows(codes, scales, zeros, xp, m, k, group_size, op, n_padded);
#endif
  return out;
}
