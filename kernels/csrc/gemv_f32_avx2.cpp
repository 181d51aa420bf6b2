// int4 weights x float32 activations for a few rows of x on AVX2 CPUs: codes dequantized in registers, fp32 FMAs.
//
// A decode step multiplies one row of x with every weight once: memory streams 0.5 byte per weight and the
// arithmetic is one multiply-add per weight. torch's CPU int4 kernel (aten's int4pack, the float path of
// AVX2 CPUs so far) spends several times longer per weight than the 4-bit stream takes (benchmarks/kernels/
// int4-cpu-avx2.md); this kernel turns the codes into floats with three instructions per 8 weights.
//
// Numbers: per group g of row n, acc = sum_k (c[n, k] - z[n, g]) * x[k] in fp32 (c - z exact, FMA: one rounding
// per step, two chains: the low-nibble and the high-nibble k of each chunk), then y += fl(s[n, g] * acc) in fp32
// (one FMA per group). Against the reference (fp32 weights fl((c - z) * s), products summed in fp32) only the
// place of the scale's rounding and the summation order differ: tests/kernels/helpers.py TOLERANCES.
//
// Layout: the form of kernels/int8_act.py (`vnni_codes`), shared with the int8-activation path: a 64-byte chunk
// holds 16 rows x 8 k; its 32-byte halves are 8 rows each, and each 32-bit lane of a half is one row's 4 low-nibble
// k and 4 high-nibble k. vpand / vpsrlw + vpand split the nibbles once per half; then one vpshufb per k moves
// byte i of every lane to a zero-extended int32, vcvtdq2ps makes it float, vsubps takes the zero point, and one
// vfmadd231ps multiplies it with the broadcast x[k]. Scales (stored dtype) and zero points (uint8) (P, G, 16).
//
// Compiled for AVX2 + FMA + F16C through a target pragma and run where the CPU reports them
// (`gemv_f32_avx2_supported`); a group size must be a multiple of 8 (every stored group size is).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QAT_GEMV_AVX2 1
#include <immintrin.h>
#else
#define QAT_GEMV_AVX2 0
#endif

// The weight form's checks, shared with int8_act_gemm (int8_act_gemm.cpp).
void check_vnni_form(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t n,
                     int64_t k);

bool gemv_f32_avx2_supported() {
#if QAT_GEMV_AVX2
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

#if QAT_GEMV_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace {

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {
  const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16));
}
inline __m256 load8(const at::Half* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }

template <typename Scale>
struct Problem {
  const float* x;        // (M, K)
  const uint8_t* codes;  // (P, K / 8, 64)
  const Scale* scales;   // (P, G, 16)
  const uint8_t* zeros;  // (P, G, 16)
  float* out;            // (M, N)
  int64_t m, n, k, group;
};

// Panels per tile. 1: 4 independent FMA chains already keep up with the 3 other instructions per FMA (2 panels,
// 8 chains, measured 5 % slower on the AVX2 EPYC: 1.07 against 1.14 ms for 4096 x 4096, M = 1, one thread).
constexpr int kPanels = 1;

// vpshufb controls: byte i of each 32-bit lane to the lane's low byte, the other three bytes zero.
inline __m256i byte_of_lanes(int i) {
  const char z = static_cast<char>(0x80);
  const char b0 = static_cast<char>(i), b1 = static_cast<char>(4 + i), b2 = static_cast<char>(8 + i),
             b3 = static_cast<char>(12 + i);
  return _mm256_setr_epi8(b0, z, z, z, b1, z, z, z, b2, z, z, z, b3, z, z, z,
                          b0, z, z, z, b1, z, z, z, b2, z, z, z, b3, z, z, z);
}

// One row of x against NP panels p .. p + NP - 1 (16 outputs each, 2 halves of 8).
template <int NP, typename Scale>
void panel_row(const Problem<Scale>& pr, int64_t row, int64_t p0) {
  constexpr int H = 2 * NP;
  const int64_t chunks = pr.k / 8, groups = pr.k / pr.group, chunks_per_group = pr.group / 8;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i pick[4] = {byte_of_lanes(0), byte_of_lanes(1), byte_of_lanes(2), byte_of_lanes(3)};
  const uint8_t* half[H];
  for (int h = 0; h < H; ++h) half[h] = pr.codes + (p0 + h / 2) * chunks * 64 + 32 * (h % 2);
  const float* x = pr.x + row * pr.k;
  __m256 y[H];
  for (int h = 0; h < H; ++h) y[h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 zero[H], low_sum[H], high_sum[H];
    for (int h = 0; h < H; ++h) {
      const uint8_t* zeros = pr.zeros + ((p0 + h / 2) * groups + g) * 16 + 8 * (h % 2);
      zero[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros))));
      low_sum[h] = _mm256_setzero_ps();
      high_sum[h] = _mm256_setzero_ps();
    }
    for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
      __m256i low[H], high[H];
      for (int h = 0; h < H; ++h) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half[h] + c * 64));
        low[h] = _mm256_and_si256(bytes, nibble);
        high[h] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
      }
      for (int i = 0; i < 4; ++i) {
        const __m256 x_low = _mm256_broadcast_ss(x + 8 * c + i), x_high = _mm256_broadcast_ss(x + 8 * c + 4 + i);
        for (int h = 0; h < H; ++h) {
          const __m256 w_low = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(low[h], pick[i])), zero[h]);
          const __m256 w_high = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(high[h], pick[i])), zero[h]);
          low_sum[h] = _mm256_fmadd_ps(w_low, x_low, low_sum[h]);
          high_sum[h] = _mm256_fmadd_ps(w_high, x_high, high_sum[h]);
        }
      }
    }
    for (int h = 0; h < H; ++h) {
      const __m256 scale = load8(pr.scales + ((p0 + h / 2) * groups + g) * 16 + 8 * (h % 2));
      y[h] = _mm256_fmadd_ps(scale, _mm256_add_ps(low_sum[h], high_sum[h]), y[h]);
    }
  }
  float* out_row = pr.out + row * pr.n;
  for (int h = 0; h < H; ++h) {
    const int64_t n0 = (p0 + h / 2) * 16 + 8 * (h % 2), valid = std::min<int64_t>(8, pr.n - n0);
    if (valid == 8) {
      _mm256_storeu_ps(out_row + n0, y[h]);
    } else if (valid > 0) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, y[h]);
      std::memcpy(out_row + n0, lanes, valid * sizeof(float));
    }
  }
}

template <typename Scale>
void run(const Problem<Scale>& pr) {
  const int64_t panels = (pr.n + 15) / 16, steps = (panels + kPanels - 1) / kPanels;
  at::parallel_for(0, steps, 2, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const int64_t p0 = s * kPanels;
      for (int64_t row = 0; row < pr.m; ++row) {
        if (panels - p0 >= kPanels) panel_row<kPanels>(pr, row, p0);
        else for (int64_t p = p0; p < panels; ++p) panel_row<1>(pr, row, p);
      }
    }
  });
}

}  // namespace

void gemv_f32_avx2(const float* x, const uint8_t* codes, const void* scales, at::ScalarType scale_type,
                   const uint8_t* zeros, float* out, int64_t m, int64_t n, int64_t k, int64_t group) {
  const auto solve = [&](const auto* scale_data) {
    using Scale = std::remove_const_t<std::remove_pointer_t<decltype(scale_data)>>;
    run(Problem<Scale>{x, codes, scale_data, zeros, out, m, n, k, group});
  };
  if (scale_type == at::kFloat) solve(static_cast<const float*>(scales));
  else if (scale_type == at::kBFloat16) solve(static_cast<const at::BFloat16*>(scales));
  else solve(static_cast<const at::Half*>(scales));
}
#pragma GCC pop_options
#endif

// x float32 (M, K) contiguous; codes uint8 (P, K / 8, 64), scales float32 / bfloat16 / float16 and zeros uint8
// (P, G, 16) as kernels/int8_act.py `vnni_form` builds them; K / G a multiple of 8. Returns float32 (M, N).
at::Tensor int4_gemv_f32(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t n) {
  TORCH_CHECK(gemv_f32_avx2_supported(), "int4_gemv_f32 needs a CPU with AVX2, FMA and F16C");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 (M, K)");
  const int64_t m = x.size(0), k = x.size(1);
  check_vnni_form(codes, scales, zeros, n, k);
  const at::ScalarType scale_type = scales.scalar_type();
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % 8 == 0, "K = ", k, " must split into ", groups,
              " groups of a multiple of 8");
  at::Tensor out = at::empty({m, n}, x.options());
#if QAT_GEMV_AVX2
  if (m > 0)
    gemv_f32_avx2(x.data_ptr<float>(), codes.data_ptr<uint8_t>(), scales.data_ptr(), scale_type,
                  zeros.data_ptr<uint8_t>(), out.data_ptr<float>(), m, n, k, k / groups);
#endif
  return out;
}
