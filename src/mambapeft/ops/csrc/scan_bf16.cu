#include "scan_launch.cuh"

namespace mambapeft_scan {
cudaError_t launch_bf16(const Params &p, bool forward, int batch, cudaStream_t stream) {
  return launch<__nv_bfloat16>(p, forward, batch, stream);
}
}  // namespace mambapeft_scan
