#include "scan_launch.cuh"

namespace mambapeft_scan {
cudaError_t launch_f16(const Params &p, bool forward, int batch, cudaStream_t stream) {
  return launch<__half>(p, forward, batch, stream);
}
}  // namespace mambapeft_scan
