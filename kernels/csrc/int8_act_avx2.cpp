// int4 weights x int8 activations on AVX2 CPUs (no AVX-512 VNNI): the numbers of int8_act_gemm.cpp, bit for bit
// in the activation quantizer and to fp32 summation order in the product, with 256-bit integer instructions.
//
// AVX2 has no vpdpbusd. Its pair, llama.cpp's Q4 x Q8 dot product on such CPUs, is vpmaddubsw (u8 x s8 -> pairs
// summed to int16, saturating) then vpmaddwd with ones (int16 pairs -> int32). Saturation cannot happen here:
// a code is at most 15 and |q| at most 127, so one int16 lane of vpmaddubsw is at most 2 * 15 * 127 = 3810, and
// four chunks of 8 k (32 k: the low and the high nibbles of each) sum to at most 8 * 3810 = 30480 < 32767. So
// the int16 sums run over up to 4 chunks before one vpmaddwd widens them into the int32 block sum: 8 vpmaddubsw,
// 8 vpaddw and one vpmaddwd per 32 k and 8 outputs, where VNNI spends 8 vpdpbusd per 32 k and 16 outputs.
//
// Layout: the form of kernels/int8_act.py (`vnni_codes`) unchanged: a 64-byte chunk holds 16 rows x 8 k, so its
// two 32-byte halves are rows 0-7 and rows 8-15, each 8 rows x 4 k in the low nibbles (the next 4 k in the high).
// The per-block arithmetic is int8_act_gemm.cpp's: I = sum c q - z Q exact in int32, then
// acc = fma(fl(s * sx), float(I), acc) once per block, so the same tests bound both builds.
//
// Compiled for AVX2 + FMA + F16C through a target pragma (the rest of the library keeps the default flags, so no
// other file's arithmetic changes) and used only where the CPU reports those features (`int8_act_avx2_supported`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QAT_INT8_ACT_AVX2 1
#include <immintrin.h>
#else
#define QAT_INT8_ACT_AVX2 0
#endif

bool int8_act_avx2_supported() {
#if QAT_INT8_ACT_AVX2
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

#if QAT_INT8_ACT_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace {

constexpr int kChunksPerFlush = 4;  // chunks of 8 k whose int16 sums cannot overflow (see the top)

// 8 values as float32 (bf16 and fp16 widen exactly).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {
  const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16));
}
inline __m256 load8(const at::Half* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int32_t sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

template <typename Scale>
struct Problem {
  const int8_t* q;       // (M, K)
  const float* sx;       // (M, B)
  const int32_t* qsum;   // (M, B)
  const uint8_t* codes;  // (P, K / 8, 64)
  const Scale* scales;   // (P, G, 16)
  const uint8_t* zeros;  // (P, G, 16)
  float* out;            // (M, N)
  int64_t m, n, k, block, blocks_per_group;
};

// Rows m0 .. m0 + MT - 1 of x against panels p0 .. p0 + NP - 1 (2 NP vectors of 8 outputs).
template <int MT, int NP, typename Scale>
void tile(const Problem<Scale>& pr, int64_t m0, int64_t p0) {
  constexpr int H = 2 * NP;
  const int64_t chunks = pr.k / 8, blocks = pr.k / pr.block, groups = blocks / pr.blocks_per_group;
  const int64_t chunks_per_block = pr.block / 8;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MT][H];
  for (int r = 0; r < MT; ++r)
    for (int h = 0; h < H; ++h) acc[r][h] = _mm256_setzero_ps();
  const uint8_t* half[H];
  for (int h = 0; h < H; ++h) half[h] = pr.codes + (p0 + h / 2) * chunks * 64 + (h % 2) * 32;
  const int8_t* row[MT];
  for (int r = 0; r < MT; ++r) row[r] = pr.q + (m0 + r) * pr.k;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t g = b / pr.blocks_per_group;
    __m256i dot[MT][H];
    for (int h = 0; h < H; ++h) {
      const uint8_t* zeros = pr.zeros + ((p0 + h / 2) * groups + g) * 16 + (h % 2) * 8;
      const __m256i zero = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros)));
      for (int r = 0; r < MT; ++r)
        dot[r][h] = _mm256_mullo_epi32(zero, _mm256_set1_epi32(-pr.qsum[(m0 + r) * blocks + b]));
    }
    for (int64_t c0 = b * chunks_per_block; c0 < (b + 1) * chunks_per_block; c0 += kChunksPerFlush) {
      const int64_t c1 = std::min<int64_t>(c0 + kChunksPerFlush, (b + 1) * chunks_per_block);
      __m256i sum16[MT][H];
      for (int r = 0; r < MT; ++r)
        for (int h = 0; h < H; ++h) sum16[r][h] = _mm256_setzero_si256();
      for (int64_t c = c0; c < c1; ++c) {
        __m256i low[H], high[H];
        for (int h = 0; h < H; ++h) {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half[h] + c * 64));
          low[h] = _mm256_and_si256(bytes, nibble);
          high[h] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
        }
        for (int r = 0; r < MT; ++r) {
          const __m256i x_low = _mm256_set1_epi32(four_bytes(row[r] + 8 * c));
          const __m256i x_high = _mm256_set1_epi32(four_bytes(row[r] + 8 * c + 4));
          for (int h = 0; h < H; ++h) {
            sum16[r][h] = _mm256_add_epi16(sum16[r][h], _mm256_maddubs_epi16(low[h], x_low));
            sum16[r][h] = _mm256_add_epi16(sum16[r][h], _mm256_maddubs_epi16(high[h], x_high));
          }
        }
      }
      for (int r = 0; r < MT; ++r)
        for (int h = 0; h < H; ++h) dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_madd_epi16(sum16[r][h], ones));
    }
    for (int h = 0; h < H; ++h) {
      const __m256 scale = load8(pr.scales + ((p0 + h / 2) * groups + g) * 16 + (h % 2) * 8);
      for (int r = 0; r < MT; ++r) {
        const __m256 both = _mm256_mul_ps(scale, _mm256_set1_ps(pr.sx[(m0 + r) * blocks + b]));
        acc[r][h] = _mm256_fmadd_ps(both, _mm256_cvtepi32_ps(dot[r][h]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < MT; ++r) {
    float* out_row = pr.out + (m0 + r) * pr.n;
    for (int h = 0; h < H; ++h) {
      const int64_t n0 = (p0 + h / 2) * 16 + (h % 2) * 8, valid = std::min<int64_t>(8, pr.n - n0);
      if (valid == 8) {
        _mm256_storeu_ps(out_row + n0, acc[r][h]);
      } else if (valid > 0) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc[r][h]);
        std::memcpy(out_row + n0, lanes, valid * sizeof(float));
      }
    }
  }
}

// Register tiles (16 ymm registers): one row of x against 2 panels (decode: 4 int32 sums, 4 int16 sums, 4 fp32
// sums), or 2 rows against one panel (more rows: the codes loaded once serve both).
constexpr int kDecodePanels = 2;
constexpr int kRowsM = 2;

template <int NP, typename Scale>
void panels(const Problem<Scale>& pr, int64_t p0) {
  if (pr.m == 1) {
    tile<1, NP, Scale>(pr, 0, p0);
    return;
  }
  for (int64_t p = p0; p < p0 + NP; ++p) {
    int64_t m0 = 0;
    for (; m0 + kRowsM <= pr.m; m0 += kRowsM) tile<kRowsM, 1, Scale>(pr, m0, p);
    if (m0 < pr.m) tile<1, 1, Scale>(pr, m0, p);
  }
}

template <typename Scale>
void run(const Problem<Scale>& pr) {
  const int64_t total = (pr.n + 15) / 16, steps = (total + kDecodePanels - 1) / kDecodePanels;
  at::parallel_for(0, steps, 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const int64_t p0 = s * kDecodePanels;
      if (total - p0 >= 2) panels<2, Scale>(pr, p0);
      else panels<1, Scale>(pr, p0);
    }
  });
}

// 8 int32 in [-127, 127] -> 8 int8 at q.
inline void store8(int8_t* q, __m256i ints) {
  const __m256i words = _mm256_packs_epi32(ints, ints);   // lanes: v0-3 v0-3 | v4-7 v4-7 (int16)
  const __m256i bytes = _mm256_packs_epi16(words, words);  // bytes 0-3: v0-3; bytes 16-19: v4-7
  const __m256i gathered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm256_castsi256_si128(gathered));
}

// One row, as int8_act_gemm.cpp's `quantize_row` (the specification: kernels/int8_act.py).
template <typename T>
void quantize_row(const T* x, int64_t k, int64_t block, int8_t* q, float* sx, int32_t* qsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / block; ++b) {
    const T* xb = x + b * block;
    __m256 peak = _mm256_setzero_ps();
    int nonfinite = 0;
    for (int64_t i = 0; i < block; i += 8) {
      const __m256 v = load8(xb + i);
      nonfinite |= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_UNORD_Q));
      peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, v));
    }
    if (nonfinite) {
      std::memset(q + b * block, 0, block);
      sx[b] = std::numeric_limits<float>::quiet_NaN();
      qsum[b] = 0;
      continue;
    }
    const float quotient = max8(peak) / 127.0f;
    const float scale = quotient > 0.0f ? quotient : 1.0f;
    const __m256 divisor = _mm256_set1_ps(scale);
    __m256i total = _mm256_setzero_si256();
    for (int64_t i = 0; i < block; i += 8) {
      const __m256 ratio = _mm256_round_ps(_mm256_div_ps(load8(xb + i), divisor),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i ints = _mm256_cvtps_epi32(ratio);
      total = _mm256_add_epi32(total, ints);
      store8(q + b * block + i, ints);
    }
    sx[b] = scale;
    qsum[b] = sum8(total);
  }
}

}  // namespace

// The entry points int8_act_gemm.cpp calls where `int8_act_avx2_supported()`; shapes checked there.
void int8_act_quantize_row_avx2(const void* x, bool bf16, int64_t k, int64_t block, int8_t* q, float* sx,
                                int32_t* qsum) {
  if (bf16) quantize_row(static_cast<const at::BFloat16*>(x), k, block, q, sx, qsum);
  else quantize_row(static_cast<const float*>(x), k, block, q, sx, qsum);
}

void int8_act_gemm_avx2(const int8_t* q, const float* sx, const int32_t* qsum, const uint8_t* codes,
                        const void* scales, at::ScalarType scale_type, const uint8_t* zeros, float* out, int64_t m,
                        int64_t n, int64_t k, int64_t block, int64_t blocks_per_group) {
  const auto solve = [&](const auto* scale_data) {
    using Scale = std::remove_const_t<std::remove_pointer_t<decltype(scale_data)>>;
    run(Problem<Scale>{q, sx, qsum, codes, scale_data, zeros, out, m, n, k, block, blocks_per_group});
  };
  if (scale_type == at::kFloat) solve(static_cast<const float*>(scales));
  else if (scale_type == at::kBFloat16) solve(static_cast<const at::BFloat16*>(scales));
  else solve(static_cast<const at::Half*>(scales));
}
#pragma GCC pop_options
#endif
