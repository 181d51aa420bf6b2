// The small float32 operations of one Llama decode step (one token, batch 1), each as one call.
//
// Between its int4 projections a decode step runs some 20 tensor ops per layer (norms, rotary, the KV cache
// write, attention over the cache, softmax, silu, residual adds): each one a dispatch of a few microseconds for
// a vector of 576 floats, together more time than the projections on SmolLM2 (qat/hf/llama_decoder.py). Here
// they are three calls per layer, plain loops over contiguous float32:
//
//   residual_rms_norm(x, delta, weight, eps)  x += delta (in place, when given); returns rms_norm(x) * weight
//   decode_attention(qkv, cache, cos, sin, position, heads, kv_heads, scale)
//       rotates the token's q and k heads in place (cos / sin of its position, sin with rotate_half's sign
//       folded in), writes its k and v into the cache at `position`, and returns softmax(q k^T * scale) v
//       over positions 0 .. position for every query head (grouped: kv head h serves heads h * g .. h * g + g - 1)
//   silu_mul(gate_up)                          silu(gate) * up of the fused gate|up projection's output
//
// Numbers: the operations of the tensor version in float32, with sums in other orders (dot products over 8
// partial sums, the norm's mean of squares in one pass): the decoder's tests bound the difference to
// transformers at 1e-5 of the largest logit, as for the tensor version.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Eight independent partial sums: the compiler vectorizes this without reassociating anything.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  float total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

void check_float_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace

at::Tensor residual_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                             double eps) {
  check_float_vector(x, "x");
  check_float_vector(weight, "weight");
  const int64_t width = weight.numel();
  TORCH_CHECK(width > 0 && x.numel() % width == 0, "x's last dimension must be the norm's width ", width);
  float* xs = x.data_ptr<float>();
  if (delta.has_value()) {
    check_float_vector(*delta, "delta");
    TORCH_CHECK(delta->numel() == x.numel(), "delta must be shaped like x");
    const float* ds = delta->data_ptr<float>();
    for (int64_t i = 0; i < x.numel(); ++i) xs[i] += ds[i];
  }
  at::Tensor out = at::empty_like(x);
  float* os = out.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  for (int64_t row = 0; row < x.numel() / width; ++row) {
    const float* xr = xs + row * width;
    const float mean = dot(xr, xr, width) / static_cast<float>(width);
    const float inverse = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    float* orow = os + row * width;
    for (int64_t i = 0; i < width; ++i) orow[i] = w[i] * (xr[i] * inverse);
  }
  return out;
}

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cache, const at::Tensor& cos,
                            const at::Tensor& sin, int64_t position, int64_t heads, int64_t kv_heads, double scale) {
  check_float_vector(qkv, "qkv");
  check_float_vector(cache, "cache");
  check_float_vector(cos, "cos");
  check_float_vector(sin, "sin");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (",
              kv_heads, ")");
  TORCH_CHECK(cache.dim() == 3 && cache.size(0) == 2 * kv_heads, "cache must be (2 kv_heads, length, head_dim)");
  const int64_t length = cache.size(1), dim = cache.size(2), half = dim / 2, group = heads / kv_heads;
  TORCH_CHECK(dim % 2 == 0 && qkv.numel() == (heads + 2 * kv_heads) * dim, "qkv must hold ", heads + 2 * kv_heads,
              " heads of ", dim);
  TORCH_CHECK(cos.numel() == dim && sin.numel() == dim, "cos and sin must hold one position's ", dim, " values");
  TORCH_CHECK(position >= 0 && position < length, "position ", position, " is outside the cache's ", length);
  float* q = qkv.data_ptr<float>();
  float* kv = cache.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float rotated[1024];
  TORCH_CHECK(dim <= 1024, "head_dim above 1024 is not supported");
  for (int64_t h = 0; h < heads + kv_heads; ++h) {  // x * cos + roll(x, dim / 2) * sin, q and k heads
    float* head = q + h * dim;
    for (int64_t i = 0; i < dim; ++i) rotated[i] = head[i] * c[i] + head[(i + half) % dim] * s[i];
    std::copy(rotated, rotated + dim, head);
  }
  for (int64_t h = 0; h < 2 * kv_heads; ++h)  // this token's k then v heads
    std::copy(q + (heads + h) * dim, q + (heads + h + 1) * dim, kv + (h * length + position) * dim);
  const int64_t end = position + 1;
  at::Tensor out = at::empty({1, heads * dim}, qkv.options());
  float* o = out.data_ptr<float>();
  const float factor = static_cast<float>(scale);
  const auto attend = [&](int64_t first, int64_t last) {
    std::vector<float> weights(end);
    for (int64_t h = first; h < last; ++h) {
      const float* query = q + h * dim;
      const float* keys = kv + (h / group) * length * dim;
      const float* values = kv + (kv_heads + h / group) * length * dim;
      float peak = -INFINITY;
      for (int64_t l = 0; l < end; ++l) {
        weights[l] = dot(query, keys + l * dim, dim) * factor;
        peak = std::max(peak, weights[l]);
      }
      float total = 0.0f;
      for (int64_t l = 0; l < end; ++l) total += (weights[l] = std::exp(weights[l] - peak));
      float* row = o + h * dim;
      std::fill(row, row + dim, 0.0f);
      for (int64_t l = 0; l < end; ++l) {
        const float p = weights[l] / total;
        const float* v = values + l * dim;
        for (int64_t i = 0; i < dim; ++i) row[i] += p * v[i];
      }
    }
  };
  if (end * dim * heads < (1 << 16)) attend(0, heads);  // short caches: threads would cost more than they save
  else at::parallel_for(0, heads, 1, attend);
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_float_vector(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(-1) % 2 == 0, "gate_up must be (rows, 2 F)");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i) {
      const float gate = g[r * 2 * width + i], up = g[r * 2 * width + width + i];
      o[r * width + i] = gate / (1.0f + std::exp(-gate)) * up;
    }
  return out;
}
