// Per-tensor fake quantization of a float32 tensor in one pass:
//   out = (clamp(round_half_even(x / scale) + zero, qmin, qmax) - zero) * scale
// the same float32 operations, in the same order, as qat.functional.fake_quantize (x / scale is a true IEEE
// division, never a multiply by 1 / scale), so the result is bit-identical; one pass instead of six.
// Rounding: adding and subtracting 1.5 * 2^23 rounds to the nearest integer, ties to even (the default
// rounding mode), exactly as nearbyint for |v| < 2^22; larger |v| stay larger than any code range and clamp
// to the same end. NaN stays NaN (both comparisons false), +-inf clamp to qmax / qmin, as torch.clamp.
#include <torch/extension.h>

#include <ATen/Parallel.h>

namespace {

constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

// Round to nearest, ties to even (IEEE default mode); exact for |v| < 2^22. Not simplified by the compiler:
// without -ffast-math (v + M) - M is not an identity.
inline float round_half_even(float v) {
  return (v + kRoundMagic) - kRoundMagic;
}

// One chunk. Compiled twice (GCC function multiversioning, picked once at load by the CPU): AVX2 runs 8 lanes
// per instruction instead of SSE2's 4 (the division bounds this loop). No FMA is enabled, and the vectorizer
// keeps each element's operations and their order, so both versions give the same bits.
__attribute__((target_clones("avx2", "default")))
void fake_quant_chunk(const float* src, float* dst, int64_t n, float s, float z, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    float q = round_half_even(src[i] / s) + z;
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    dst[i] = (q - z) * s;
  }
}

}  // namespace

at::Tensor fake_quant_per_tensor(const at::Tensor& x, double scale, double zero, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fake_quant_per_tensor: x must be float32");
  TORCH_CHECK(x.device().is_cpu(), "fake_quant_per_tensor: x must be on the CPU");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const float* src = input.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, input.numel(), 16384, [&](int64_t begin, int64_t end) {
    fake_quant_chunk(src + begin, dst + begin, end - begin, s, z, lo, hi);
  });
  return out;
}
