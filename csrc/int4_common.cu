// Error reporting behind the C ABI (see int4_common.cuh).
#include <stdarg.h>

#include "int4_common.cuh"

namespace awq {

char* error_buffer() {
  static thread_local char buf[1024] = "";
  return buf;
}

int fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(error_buffer(), 1024, fmt, ap);
  va_end(ap);
  return code;
}

int check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail(AWQ_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
  return AWQ_OK;
}

}  // namespace awq

extern "C" {
int awq_int4_abi_version(void) { return 3; }  // 2: awq_int4_gemm_simt added; 3: awq_int4_gemm_tc
const char* awq_int4_last_error(void) { return awq::error_buffer(); }
}
