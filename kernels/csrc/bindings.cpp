// The Python module of kernels/csrc (built by kernels/native.py).
#include <torch/extension.h>

void dequantize_tile(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t group_size, int64_t start, int64_t stop, const at::Tensor& out);
bool dequantize_vectorized();
at::Tensor small_m_bf16(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t group_size);
bool small_m_available();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_tile", &dequantize_tile, "rows of an int4 weight, K nibble-major, float32 or bfloat16");
  m.def("vectorized", &dequantize_vectorized, "whether the AVX-512 dequantizer was compiled in");
  m.def("small_m_bf16", &small_m_bf16, "int4 x bf16 for 1 to 64 rows (AVX512-BF16), float32 out");
  m.def("small_m_available", &small_m_available, "whether small_m_bf16 was compiled in");
}
