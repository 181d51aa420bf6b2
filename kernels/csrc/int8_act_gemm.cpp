// int4 weights x int8 activations (AVX512-VNNI; AVX2 CPUs: int8_act_avx2.cpp): integer dot products per block of k,
// scaled in fp32.
//
// Numbers: x comes quantized per row and per block of `block` k (kernels/int8_act.py): q = round(x / sx) in
// [-127, 127], sx = max |x| / 127 over the block. The weight is w = (c - z) * s per group (codes c 0..15, integer
// zero points z, scales s; a group holds one or more blocks). Per block b of group g:
//
//     I[m, n] = sum_{k in b} c[n, k] q[m, k] - z[n, g] Q[m, b]       (exact, int32; Q = sum of the block's q)
//     y[m, n] = sum_b fl(fl(s[n, g] * sx[m, b]) * I[m, n])             (fp32 fused multiply-add per block)
//
// so the only roundings are x's to int8 and the fp32 scaling and summation; with q exact (integers) the result
// matches the exact integer formula to fp32 accumulation error. Tolerance: tests/kernels/helpers.py.
//
// Layout: the weights in the form `vnni_codes` builds (kernels/int8_act.py): per panel of 16 output rows and chunk
// of 8 k, 64 bytes; byte 4 j + i holds row j's code of k = 8 c + i (low nibble) and of k = 8 c + 4 + i (high), so
// the low nibbles of a 64-byte vector are 16 rows x 4 consecutive k: the operand of one vpdpbusd (u8 codes times
// 4 broadcast int8 of x), the high nibbles the next four k. Scales (in their stored dtype: fp16 and bf16
// widen exactly) and zero points (uint8) as (panels, G, 16): no more bytes per group than stored.
// Threads share panels of output rows; a tile of kRowsM rows of x runs against kPanels panels at a time with
// kRowsM x kPanels int32 accumulators in registers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define QAT_INT8_ACT_AVX512 1
#else
#define QAT_INT8_ACT_AVX512 0
#endif

// The AVX2 build of the same numbers (kernels/csrc/int8_act_avx2.cpp), for CPUs without AVX-512 VNNI.
bool int8_act_avx2_supported();
void int8_act_quantize_row_avx2(const void* x, bool bf16, int64_t k, int64_t block, int8_t* q, float* sx,
                                int32_t* qsum);
void int8_act_gemm_avx2(const int8_t* q, const float* sx, const int32_t* qsum, const uint8_t* codes,
                        const void* scales, at::ScalarType scale_type, const uint8_t* zeros, float* out, int64_t m,
                        int64_t n, int64_t k, int64_t block, int64_t blocks_per_group);

#if QAT_INT8_ACT_AVX512
namespace {

// 4 x 3: 12 int32 accumulators + 12 fp32 sums + 6 code vectors fit the 32 registers (6 x 3 and 4 x 4 spill and
// ran 10-15 % slower here; 6 x 2 was as fast).
constexpr int kRowsM = 4;   // rows of x per register tile
constexpr int kPanels = 3;  // panels of 16 outputs per register tile

// 16 values as float32 (bf16 and fp16 widen exactly).
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {
  const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16));
}
inline __m512 load16(const at::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

template <typename Scale>
struct Problem {
  const int8_t* q;          // (M, K)
  const float* sx;          // (M, B)
  const int32_t* qsum;      // (M, B)
  const uint8_t* codes;     // (P, K / 8, 64)
  const Scale* scales;      // (P, G, 16), the stored scale dtype
  const uint8_t* zeros;     // (P, G, 16)
  float* out;               // (M, N)
  int64_t m, n, k, block, blocks_per_group;
};

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Rows m0 .. m0 + MT - 1 of x against panels p0 .. p0 + NP - 1.
template <int MT, int NP, typename Scale>
void tile(const Problem<Scale>& pr, int64_t m0, int64_t p0) {
  const int64_t chunks = pr.k / 8, blocks = pr.k / pr.block, groups = blocks / pr.blocks_per_group;
  const int64_t chunks_per_block = pr.block / 8;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[MT][NP];
  for (int r = 0; r < MT; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  const uint8_t* panel[NP];
  for (int p = 0; p < NP; ++p) panel[p] = pr.codes + (p0 + p) * chunks * 64;
  const int8_t* row[MT];
  for (int r = 0; r < MT; ++r) row[r] = pr.q + (m0 + r) * pr.k;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t g = b / pr.blocks_per_group;
    __m512i dot[MT][NP];
    for (int p = 0; p < NP; ++p) {
      const uint8_t* zeros = pr.zeros + ((p0 + p) * groups + g) * 16;
      const __m512i zero = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros)));
      for (int r = 0; r < MT; ++r)
        dot[r][p] = _mm512_mullo_epi32(zero, _mm512_set1_epi32(-pr.qsum[(m0 + r) * blocks + b]));
    }
    for (int64_t c = b * chunks_per_block; c < (b + 1) * chunks_per_block; ++c) {
      __m512i low[NP], high[NP];
      for (int p = 0; p < NP; ++p) {
        const __m512i bytes = _mm512_loadu_si512(panel[p] + c * 64);
        low[p] = _mm512_and_si512(bytes, nibble);
        high[p] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
      }
      for (int r = 0; r < MT; ++r) {
        const __m512i x_low = _mm512_set1_epi32(four_bytes(row[r] + 8 * c));
        const __m512i x_high = _mm512_set1_epi32(four_bytes(row[r] + 8 * c + 4));
        for (int p = 0; p < NP; ++p) {
          dot[r][p] = _mm512_dpbusd_epi32(dot[r][p], low[p], x_low);
          dot[r][p] = _mm512_dpbusd_epi32(dot[r][p], high[p], x_high);
        }
      }
    }
    for (int p = 0; p < NP; ++p) {
      const __m512 scale = load16(pr.scales + ((p0 + p) * groups + g) * 16);
      for (int r = 0; r < MT; ++r) {
        const __m512 both = _mm512_mul_ps(scale, _mm512_set1_ps(pr.sx[(m0 + r) * blocks + b]));
        acc[r][p] = _mm512_fmadd_ps(both, _mm512_cvtepi32_ps(dot[r][p]), acc[r][p]);
      }
    }
  }
  for (int r = 0; r < MT; ++r) {
    float* out_row = pr.out + (m0 + r) * pr.n;
    for (int p = 0; p < NP; ++p) {
      const int64_t n0 = (p0 + p) * 16, valid = std::min<int64_t>(16, pr.n - n0);
      const __mmask16 mask = valid == 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
      _mm512_mask_storeu_ps(out_row + n0, mask, acc[r][p]);
    }
  }
}

template <int NP, typename Scale>
void panels(const Problem<Scale>& pr, int64_t p0) {
  int64_t m0 = 0;
  for (; m0 + kRowsM <= pr.m; m0 += kRowsM) tile<kRowsM, NP, Scale>(pr, m0, p0);
  switch (pr.m - m0) {
    case 1: tile<1, NP, Scale>(pr, m0, p0); break;
    case 2: tile<2, NP, Scale>(pr, m0, p0); break;
    case 3: tile<3, NP, Scale>(pr, m0, p0); break;
    default: break;
  }
}

template <typename Scale>
void run(const Problem<Scale>& pr) {
  const int64_t total = (pr.n + 15) / 16, steps = (total + kPanels - 1) / kPanels;
  at::parallel_for(0, steps, 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const int64_t p0 = s * kPanels;
      switch (std::min<int64_t>(kPanels, total - p0)) {
        case 3: panels<3, Scale>(pr, p0); break;
        case 2: panels<2, Scale>(pr, p0); break;
        default: panels<1, Scale>(pr, p0); break;
      }
    }
  });
}

// One row: per block, sx = max |x| / 127 (1 where that is 0), q = round(x / sx) (nearest even), Q = sum q.
// A block holding an infinity or NaN gets sx = NaN (and q = 0), so every output of its row is NaN, as in a float
// GEMM, instead of a finite value made from saturated integers.
template <typename T>
void quantize_row(const T* x, int64_t k, int64_t block, int8_t* q, float* sx, int32_t* qsum) {
  for (int64_t b = 0; b < k / block; ++b) {
    const T* xb = x + b * block;
    __m512 peak = _mm512_setzero_ps();
    __mmask16 nonfinite = 0;
    for (int64_t i = 0; i < block; i += 16) {
      const __m512 v = load16(xb + i);
      nonfinite |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_UNORD_Q);  // inf - inf: NaN
      peak = _mm512_max_ps(peak, _mm512_abs_ps(v));
    }
    if (nonfinite) {
      std::memset(q + b * block, 0, block);
      sx[b] = std::numeric_limits<float>::quiet_NaN();
      qsum[b] = 0;
      continue;
    }
    const float quotient = _mm512_reduce_max_ps(peak) / 127.0f;
    const float scale = quotient > 0.0f ? quotient : 1.0f;  // all zero, or so small that max / 127 underflows
    const __m512 divisor = _mm512_set1_ps(scale);
    __m512i total = _mm512_setzero_si512();
    for (int64_t i = 0; i < block; i += 16) {
      const __m512 ratio = _mm512_roundscale_ps(_mm512_div_ps(load16(xb + i), divisor), _MM_FROUND_TO_NEAREST_INT);
      const __m512i ints = _mm512_cvtps_epi32(ratio);
      total = _mm512_add_epi32(total, ints);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * block + i), _mm512_cvtsepi32_epi8(ints));
    }
    sx[b] = scale;
    qsum[b] = _mm512_reduce_add_epi32(total);
  }
}

}  // namespace
#endif

bool int8_act_available() { return QAT_INT8_ACT_AVX512 || int8_act_avx2_supported(); }

// The weight form kernels/int8_act.py `vnni_form` builds, as int8_act_gemm and int4_gemv_f32 (gemv_f32_avx2.cpp)
// read it: codes uint8 (P, K / 8, 64), scales float32 / bfloat16 / float16 and zeros uint8 (P, G, 16), P = ceil(N / 16).
void check_vnni_form(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t n,
                     int64_t k) {
  const int64_t panels = (n + 15) / 16;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && k % 8 == 0 &&
                  codes.sizes() == at::IntArrayRef({panels, k / 8, 64}),
              "codes must be contiguous uint8 (ceil(N / 16), K / 8, 64)");
  const at::ScalarType scale_type = scales.scalar_type();
  TORCH_CHECK((scale_type == at::kFloat || scale_type == at::kBFloat16 || scale_type == at::kHalf) &&
                  scales.is_contiguous() && scales.dim() == 3 && scales.size(0) == panels && scales.size(2) == 16,
              "scales must be contiguous float32, bfloat16 or float16 (ceil(N / 16), G, 16)");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "zeros must be contiguous uint8 shaped like scales");
}

// x bfloat16 or float32 (M, K) contiguous, block a multiple of 16 dividing K. Returns (q int8 (M, K), sx float32
// (M, K / block), qsum int32 (M, K / block)), as kernels/int8_act.py `quantize_activations_reference` defines them.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(int8_act_available(), "quantize_activations needs AVX2 + FMA + F16C or a build with AVX-512 VNNI");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.is_contiguous() &&
                  x.dim() == 2, "x must be contiguous float32 or bfloat16 (M, K)");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(block > 0 && block % 16 == 0 && k % block == 0, "block must be a multiple of 16 dividing K = ", k,
              ", got ", block);
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({m, k / block}, x.options().dtype(at::kFloat));
  at::Tensor qsum = at::empty({m, k / block}, x.options().dtype(at::kInt));
  int8_t* q_data = q.data_ptr<int8_t>();
  float* sx_data = sx.data_ptr<float>();
  int32_t* qsum_data = qsum.data_ptr<int32_t>();
  const int64_t blocks = k / block;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const char* x_data = static_cast<const char*>(x.data_ptr());
  const int64_t row_bytes = k * x.element_size();
  at::parallel_for(0, m, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
#if QAT_INT8_ACT_AVX512
      if (bf16)
        quantize_row(reinterpret_cast<const at::BFloat16*>(x_data + r * row_bytes), k, block, q_data + r * k,
                     sx_data + r * blocks, qsum_data + r * blocks);
      else
        quantize_row(reinterpret_cast<const float*>(x_data + r * row_bytes), k, block, q_data + r * k,
                     sx_data + r * blocks, qsum_data + r * blocks);
#else
      int8_act_quantize_row_avx2(x_data + r * row_bytes, bf16, k, block, q_data + r * k, sx_data + r * blocks,
                                 qsum_data + r * blocks);
#endif
    }
  });
  return {q, sx, qsum};
}

// q int8 (M, K), sx float32 (M, B), qsum int32 (M, B) with B = K / block; codes uint8 (P, K / 8, 64); scales float32,
// bfloat16 or float16 and zeros uint8 (P, G, 16), P = ceil(N / 16). Returns float32 (M, N).
at::Tensor int8_act_gemm(const at::Tensor& q, const at::Tensor& sx, const at::Tensor& qsum, const at::Tensor& codes,
                         const at::Tensor& scales, const at::Tensor& zeros, int64_t n, int64_t block) {
  TORCH_CHECK(int8_act_available(), "int8_act_gemm needs AVX2 + FMA + F16C or a build with AVX-512 VNNI");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2, "q must be contiguous int8 (M, K)");
  const int64_t m = q.size(0), k = q.size(1);
  TORCH_CHECK(block > 0 && block % 8 == 0 && k % block == 0, "block must be a multiple of 8 dividing K = ", k,
              ", got ", block);
  TORCH_CHECK(sx.scalar_type() == at::kFloat && sx.is_contiguous() && sx.sizes() == at::IntArrayRef({m, k / block}),
              "sx must be contiguous float32 (M, K / block)");
  TORCH_CHECK(qsum.scalar_type() == at::kInt && qsum.is_contiguous() && qsum.sizes() == sx.sizes(),
              "qsum must be contiguous int32 (M, K / block)");
  check_vnni_form(codes, scales, zeros, n, k);
  const at::ScalarType scale_type = scales.scalar_type();
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups > 0 && (k / block) % groups == 0, "the ", k / block, " blocks must split evenly into ", groups,
              " groups");
  at::Tensor out = at::empty({m, n}, q.options().dtype(at::kFloat));
#if !QAT_INT8_ACT_AVX512
  if (m > 0)
    int8_act_gemm_avx2(q.data_ptr<int8_t>(), sx.data_ptr<float>(), qsum.data_ptr<int32_t>(), codes.data_ptr<uint8_t>(),
                       scales.data_ptr(), scale_type, zeros.data_ptr<uint8_t>(), out.data_ptr<float>(), m, n, k, block,
                       (k / block) / groups);
#else
  if (m > 0) {
    const auto solve = [&](auto* scale_data) {
      using Scale = std::remove_const_t<std::remove_pointer_t<decltype(scale_data)>>;
      const Problem<Scale> problem{q.data_ptr<int8_t>(), sx.data_ptr<float>(), qsum.data_ptr<int32_t>(),
                                   codes.data_ptr<uint8_t>(), scale_data, zeros.data_ptr<uint8_t>(),
                                   out.data_ptr<float>(), m, n, k, block, (k / block) / groups};
      run(problem);
    };
    if (scale_type == at::kFloat) solve(scales.data_ptr<float>());
    else if (scale_type == at::kBFloat16) solve(scales.data_ptr<at::BFloat16>());
    else solve(scales.data_ptr<at::Half>());
  }
#endif
  return out;
}

// quantize_activations then int8_act_gemm in one call (no Python between them): x bfloat16 or float32 (M, K)
// contiguous; the weight tensors as for int8_act_gemm. Returns float32 (M, N).
at::Tensor int8_act_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t n, int64_t block) {
  const std::vector<at::Tensor> quantized = quantize_activations(x, block);
  return int8_act_gemm(quantized[0], quantized[1], quantized[2], codes, scales, zeros, n, block);
}
