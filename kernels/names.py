"""The int4 backend names, one constant each: dispatch.py registers them, autotune.py and the benchmarks pick
and time them by these names.

The strings are public: `backend=` and $QAT_KERNEL_BACKEND take them (dispatch.py says what each one runs).
Kernel form names (the keys of `PackedInt4Weight.form`) live with the code that builds the form.
"""

REFERENCE = "reference"
DEQUANT = "dequant"
DEQUANT_CACHED = "dequant_cached"
CPU_INT4PACK = "cpu_int4pack"
CPU_BF16_CACHED = "cpu_bf16_cached"
CPU_BLOCKED = "cpu_blocked"
CPU_BLOCKED_BF16 = "cpu_blocked_bf16"
CPU_SMALL_M = "cpu_small_m"
CPU_INT8_ACT = "cpu_int8_act"
CPU_GEMV_F32 = "cpu_gemv_f32"
TRITON = "triton"
TRITON_GEMV = "triton_gemv"
TRITON_GEMM = "triton_gemm"
