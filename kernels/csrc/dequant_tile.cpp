// Rows of an int4 weight dequantized in one pass, for the blocked CPU path (kernels/blocked.py).
//
// out[r, :] = row (start + r) of W with K in "nibble-major" order: per group of the layer, the
// codes at even k (low nibbles), then the codes at odd k (high nibbles). Each value is
// (code - zero) * scale computed in float32, exactly as reference.dequantize_int4 does, then
// rounded once to the output dtype (bf16: round to nearest even, as torch's .to(bfloat16)), so
// the tile is bit-identical to the reference's weights, permuted.
//
// Vector path (AVX-512 F/BW/BF16, 16 values per step) where the build and the CPU have it; a
// scalar loop otherwise. Rows are split across torch's intra-op threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define QAT_DEQUANT_AVX512 1
#else
#define QAT_DEQUANT_AVX512 0
#endif

namespace {

inline uint16_t float_to_bf16_rne(float value) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

template <typename Out>
inline void store_scalar(Out* dst, float value);
template <>
inline void store_scalar<float>(float* dst, float value) { *dst = value; }
template <>
inline void store_scalar<uint16_t>(uint16_t* dst, float value) { *dst = float_to_bf16_rne(value); }

// One group's half (g/2 codes from g/2 bytes, one nibble each) into dst, scalar.
template <typename Out>
inline void half_group_scalar(const uint8_t* bytes, int64_t count, int shift, float zero, float scale, Out* dst) {
  for (int64_t i = 0; i < count; ++i) {
    const float code = static_cast<float>((bytes[i] >> shift) & 0x0F);
    store_scalar(dst + i, (code - zero) * scale);
  }
}

#if QAT_DEQUANT_AVX512
inline __m512 codes16(const uint8_t* bytes, int shift) {
  const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(wide, shift), _mm512_set1_epi32(0x0F)));
}

template <typename Out>
inline void store16(Out* dst, __m512 values);
template <>
inline void store16<float>(float* dst, __m512 values) { _mm512_storeu_ps(dst, values); }
template <>
inline void store16<uint16_t>(uint16_t* dst, __m512 values) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(values)));
}
#endif

template <typename Out>
void half_group(const uint8_t* bytes, int64_t count, int shift, float zero, float scale, Out* dst) {
  int64_t i = 0;
#if QAT_DEQUANT_AVX512
  const __m512 z = _mm512_set1_ps(zero), s = _mm512_set1_ps(scale);
  for (; i + 16 <= count; i += 16) {
    // (code - zero) * scale: the subtraction is exact (small integers), one rounding in the multiply, as the reference
    store16(dst + i, _mm512_mul_ps(_mm512_sub_ps(codes16(bytes + i, shift), z), s));
  }
#endif
  half_group_scalar(bytes + i, count - i, shift, zero, scale, dst + i);
}

template <typename Out>
void dequantize_rows(const uint8_t* packed, const float* scales, const float* zeros, int64_t groups,
                     int64_t group_size, int64_t start, int64_t stop, Out* out) {
  const int64_t half = group_size / 2, row_bytes = groups * half, k = groups * group_size;
  at::parallel_for(start, stop, 16, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const uint8_t* bytes = packed + row * row_bytes;
      Out* dst = out + (row - start) * k;
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = scales[row * groups + g];
        const float zero = zeros[row * groups + g];
        half_group(bytes + g * half, half, 0, zero, scale, dst + g * group_size);          // even k
        half_group(bytes + g * half, half, 4, zero, scale, dst + g * group_size + half);   // odd k
      }
    }
  });
}

}  // namespace

// packed uint8 (N, K/2), scales and zeros float32 (N, G) (`weights.float_qparams`: zeros 8 for symmetric layers),
// rows [start, stop) into out (stop - start, K), float32 or bfloat16, contiguous.
void dequantize_tile(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t group_size, int64_t start, int64_t stop, const at::Tensor& out) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2,
              "packed must be contiguous uint8 (N, K/2)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales must be contiguous float32");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(group_size % 2 == 0 && groups * group_size == packed.size(1) * 2, "group_size does not match K");
  TORCH_CHECK(0 <= start && start <= stop && stop <= packed.size(0), "rows out of range");
  TORCH_CHECK(out.is_contiguous() && out.size(0) >= stop - start && out.size(1) == groups * group_size,
              "out must be contiguous (>= stop - start, K)");
  TORCH_CHECK(zeros.scalar_type() == at::kFloat && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "zeros must be contiguous float32 like scales");
  const float* zero_ptr = zeros.data_ptr<float>();
  if (out.scalar_type() == at::kFloat) {
    dequantize_rows(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), zero_ptr, groups, group_size, start, stop,
                    out.data_ptr<float>());
  } else {
    TORCH_CHECK(out.scalar_type() == at::kBFloat16, "out must be float32 or bfloat16");
    dequantize_rows(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), zero_ptr, groups, group_size, start, stop,
                    reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  }
}

bool dequantize_vectorized() { return QAT_DEQUANT_AVX512; }
