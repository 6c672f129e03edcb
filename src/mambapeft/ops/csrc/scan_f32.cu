#include "scan_launch.cuh"

namespace mambapeft_scan {
cudaError_t launch_f32(const Params &p, bool forward, int batch, cudaStream_t stream) {
  return launch<float>(p, forward, batch, stream);
}
}  // namespace mambapeft_scan
