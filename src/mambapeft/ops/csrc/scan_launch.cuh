// The launchers: which kernel runs a call (scan.h: lanes() decides between the layouts).
#pragma once
#include "scan_bwd_lanes.cuh"

namespace mambapeft_scan {

// The kernels along channels and states (scan.h: lanes() says where), the block scan's otherwise; `Wide`: 1.5x
// scan.h's states a thread (lanes_wide).
template <typename T, int TPC, bool Wide>
cudaError_t launch_lanes(const Params &p, bool forward, int batch, cudaStream_t stream) {
  // the backward in pieces of time (scan.h: lanes_pieces), in the wide layout only: a block an item
  const bool pieces = !forward && Wide && p.pieces > 1;
  const dim3 grid(batch, (p.dim + 31) / 32, pieces ? p.pieces : 1);
  if (forward) {
    constexpr int NS = lanes_ns(MAMBAPEFT_SCAN_LANES_STATES, Wide);
    fwd_lanes_kernel<NS, TPC, T><<<grid, 32 * TPC, 0, stream>>>(p);
  } else {
    constexpr int NS = lanes_ns(MAMBAPEFT_SCAN_LANES_BWD_STATES, Wide);
    // over the 48 KB of static shared memory: asked for at each launch (cheap, and right on any device)
    constexpr size_t smem = sizeof(BwdLanesSmem<NS, TPC, T>);
    auto go = [&](auto kernel) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err == cudaSuccess) kernel<<<grid, 32 * TPC, smem, stream>>>(p);
      return err;
    };
    const cudaError_t err = pieces ? go(bwd_lanes_kernel<NS, TPC, T, Wide>) : go(bwd_lanes_kernel<NS, TPC, T, false>);
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const Params &p, bool forward, int batch, cudaStream_t stream) {
  if (lanes(p, forward, batch)) {
    switch (lanes_threads_per_channel(p, forward, batch)) {
      case 1: return launch_lanes<T, 1, false>(p, forward, batch, stream);
      case 2: return launch_lanes<T, 2, false>(p, forward, batch, stream);
      case 4:
        return lanes_wide(p, forward, batch) ? launch_lanes<T, 4, true>(p, forward, batch, stream)
                                             : launch_lanes<T, 4, false>(p, forward, batch, stream);
      default: return launch_lanes<T, 8, false>(p, forward, batch, stream);
    }
  }
  auto go = [&](auto kernel, int threads) {
    const size_t smem = (forward ? 1 : 3 + threads / 32) * p.dstate * sizeof(float);
    kernel<<<dim3(batch, p.dim), threads, smem, stream>>>(p);
    return cudaGetLastError();
  };
  constexpr int KF = MAMBAPEFT_SCAN_ITEMS_FWD, KB = MAMBAPEFT_SCAN_ITEMS_BWD;
  switch (chunk_size(p.len)) {
    case 32: return forward ? go(fwd_kernel<32, 1, T>, 32) : go(bwd_kernel<32, 1, T>, 32);
    case 256: return forward ? go(fwd_kernel<32, 8, T>, 32) : go(bwd_kernel<32, 8, T>, 32);
    case 512: return forward ? go(fwd_kernel<512 / KF, KF, T>, 512 / KF) : go(bwd_kernel<512 / KB, KB, T>, 512 / KB);
    case 1024:
      return forward ? go(fwd_kernel<1024 / KF, KF, T>, 1024 / KF) : go(bwd_kernel<1024 / KB, KB, T>, 1024 / KB);
    default:
      return forward ? go(fwd_kernel<2048 / KF, KF, T>, 2048 / KF) : go(bwd_kernel<2048 / KB, KB, T>, 2048 / KB);
  }
}

}  // namespace mambapeft_scan
