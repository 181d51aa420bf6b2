// The Python module of kernels/csrc (built by kernels/native.py).
#include <torch/extension.h>

void dequantize_tile(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t group_size, int64_t start, int64_t stop, const at::Tensor& out);
bool dequantize_vectorized();
at::Tensor small_m_bf16(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t group_size);
bool small_m_available();
std::vector<at::Tensor> quantize_activations(const at::Tensor& x, int64_t block);
at::Tensor int8_act_gemm(const at::Tensor& q, const at::Tensor& sx, const at::Tensor& qsum, const at::Tensor& codes,
                         const at::Tensor& scales, const at::Tensor& zeros, int64_t n, int64_t block);
at::Tensor int8_act_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t n, int64_t block);
bool int8_act_available();
at::Tensor int4_gemv_f32(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t n);
bool gemv_f32_avx2_supported();
at::Tensor residual_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                             double eps);
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cache, const at::Tensor& cos,
                            const at::Tensor& sin, int64_t position, int64_t heads, int64_t kv_heads, double scale);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor fake_quant_per_tensor(const at::Tensor& x, double scale, double zero, int64_t qmin, int64_t qmax);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_tile", &dequantize_tile, "rows of an int4 weight, K nibble-major, float32 or bfloat16");
  m.def("vectorized", &dequantize_vectorized, "whether the AVX-512 dequantizer was compiled in");
  m.def("small_m_bf16", &small_m_bf16, "int4 x bf16 for 1 to 64 rows (AVX512-BF16), float32 out");
  m.def("small_m_available", &small_m_available, "whether small_m_bf16 was compiled in");
  m.def("quantize_activations", &quantize_activations, "x per row and block of k to int8: (q, sx, qsum)");
  m.def("int8_act_gemm", &int8_act_gemm, "int4 codes x int8 activations (AVX512-VNNI or AVX2), float32 out");
  m.def("int8_act_linear", &int8_act_linear, "quantize_activations + int8_act_gemm in one call, float32 out");
  m.def("int8_act_available", &int8_act_available, "whether int8_act_gemm was compiled in");
  m.def("int4_gemv_f32", &int4_gemv_f32, "int4 codes x float32 rows (AVX2, codes dequantized in registers)");
  m.def("gemv_f32_available", &gemv_f32_avx2_supported, "whether int4_gemv_f32 can run on this CPU");
  m.def("residual_rms_norm", &residual_rms_norm, "x += delta in place, then RMS norm times weight (float32)");
  m.def("decode_attention", &decode_attention, "rotary, KV cache write and attention of one token (float32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate|up output (float32)");
  m.def("fake_quant_per_tensor", &fake_quant_per_tensor, "float32 per-tensor fake quantization in one pass");
}
