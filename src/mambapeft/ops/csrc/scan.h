// What the host side hands the kernels (scan_kernels.cuh); one launcher per input dtype (scan_*.cu).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace mambapeft_scan {

struct Params {
  int dim, len, dstate, n_chunks;
  bool softplus, vec;
  // 0: the launcher's choice, 1: the block scan, 2: threads along channels and states (N <= 32)
  int forward_kernel, backward_kernel;
  // (b, E, L) tensors with time contiguous: batch and channel strides in elements
  const void *u, *delta, *z, *dout;
  int64_t u_b, u_d, dt_b, dt_d, z_b, z_d, do_b, do_d;
  const void *B, *C;  // (b, N, L)
  int64_t B_b, B_n, C_b, C_n;
  const float *A, *D, *bias, *h0, *dlast;  // A (E, N); D, bias (E,); h0, dlast (b, E, N)
  float *states;                            // (b, E, n_chunks, N): the state at each chunk's end
  void *y, *du, *ddelta, *dz, *out_z;       // outputs (b, E, L)
  int64_t y_b, y_d, du_b, du_d, ddt_b, ddt_d, dz_b, dz_d, oz_b, oz_d;
  float *dA, *dB, *dC, *dD, *dbias, *dh0;   // dA (E, N), dB, dC (b, N, L) contiguous, dh0 (b, E, N)
  float *scratch;                           // the backward along channels: lanes_backward_scratch() floats
};

// Steps per chunk: one chunk up to 1024 steps (as mamba_ssm's templates), 2048-step chunks beyond; a
// one-warp chunk of 32 for a few steps (affix tokens).
__host__ __device__ inline int chunk_size(int len) {
  return len <= 32 ? 32 : len <= 256 ? 256 : len <= 512 ? 512 : len <= 1024 ? 1024 : 2048;
}

// The kernels along channels and states (scan_kernels.cuh: fwd_lanes_kernel, scan_bwd_lanes.cuh) run where
// batch * channels reach LANES_MIN (below it the block scan's forward was faster: 2 x 1536 channels, 0.09
// against 0.16 ms) and N <= 8 * LANES_STATES (a channel takes 1, 2, 4 or 8 threads of LANES_STATES states).
#ifndef MAMBAPEFT_SCAN_LANES_MIN
#define MAMBAPEFT_SCAN_LANES_MIN 8192
#endif
#ifndef MAMBAPEFT_SCAN_LANES_BWD_MIN
#define MAMBAPEFT_SCAN_LANES_BWD_MIN 8192
#endif
#ifndef MAMBAPEFT_SCAN_LANES_STATES
#define MAMBAPEFT_SCAN_LANES_STATES 4  // 8 took 1.5x as long in the forward at N = 16
#endif
#ifndef MAMBAPEFT_SCAN_LANES_BWD_STATES
#define MAMBAPEFT_SCAN_LANES_BWD_STATES 4  // the backward's; 2 (8 threads a channel at N = 16) took 1.23x as long
#endif
#ifndef MAMBAPEFT_SCAN_LANES_WIDE
#define MAMBAPEFT_SCAN_LANES_WIDE 1  // 0: no lanes_wide
#endif
#ifndef MAMBAPEFT_SCAN_LANES_WIDE_BLOCKS
#define MAMBAPEFT_SCAN_LANES_WIDE_BLOCKS 3  // the wide backward's blocks an SM (lanes_backward_blocks)
#endif
constexpr int kLanesStage = 16, kLanesHalf = 8;  // the lanes backward's steps per stage, and between kept states

inline int lanes_states(bool forward) { return forward ? MAMBAPEFT_SCAN_LANES_STATES : MAMBAPEFT_SCAN_LANES_BWD_STATES; }

// the current device's SMs, asked of the driver once a device (a launch asks several times)
inline int sm_count() {
  constexpr int kDevices = 64;
  static int counts[kDevices] = {};
  int device = 0, n = 0;
  cudaGetDevice(&device);
  if (device >= 0 && device < kDevices && counts[device]) return counts[device];
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  if (device >= 0 && device < kDevices) counts[device] = n;
  return n;
}

// Whether a channel's 4 threads hold 1.5x lanes_states each rather than 8 threads lanes_states: 17 to 24 states
// (Additional-scan's 22) then take as many threads as 16, and the state slots are 24, not 32 (8 threads of 3
// states were no faster than 8 of 4: threads add work of their own, a channel's loads, sums and shuffles). The
// backward only where its blocks fit the GPU at once (WIDE_BLOCKS an SM): at 8 x 1536 channels and 22 states it
// took 1.05 ms to 8 threads' 1.42, at 4 x 4096 (a second, partial wave) 3.41 to 3.01 (bench/results/issue13/s8).
inline bool lanes_wide(const Params &p, bool forward, int batch) {
  const int S = lanes_states(forward);
  if (!MAMBAPEFT_SCAN_LANES_WIDE || S % 2 || p.dstate <= 4 * S || p.dstate > 6 * S) return false;
  return forward || int64_t(batch) * ((p.dim + 31) / 32) <= int64_t(MAMBAPEFT_SCAN_LANES_WIDE_BLOCKS) * sm_count();
}

inline int lanes_threads_per_channel(const Params &p, bool forward, int batch) {
  const int S = lanes_states(forward), N = p.dstate;
  return N <= S ? 1 : N <= 2 * S ? 2 : N <= 4 * S || lanes_wide(p, forward, batch) ? 4 : 8;
}

// A thread's states: the knob's `states`, 1.5x that in the wide layout (lanes_wide); the launcher's
// compile-time count and the binding's run-time one (the scratch's size) both come from here.
constexpr int lanes_ns(int states, bool wide) { return wide ? states * 3 / 2 : states; }

inline int lanes_states_per_thread(const Params &p, bool forward, int batch) {
  return lanes_ns(lanes_states(forward), lanes_wide(p, forward, batch));
}

// The lanes backward's blocks an SM, which cap its registers: 128 where a channel has 4 or 8 threads of 4 states
// (512 threads an SM, all of the training shapes' blocks at once; 187 registers at 4 threads a channel left half
// of them waiting: 1.39x the time); 168 at 4 threads of 6 (3 blocks an SM still hold the 130m shape's 384); 85 at
// 8 threads of 2.
constexpr int lanes_backward_blocks(int NS, int TPC) {
  return TPC == 8 && NS <= 2 ? 3 : TPC == 4 && NS > 4 ? MAMBAPEFT_SCAN_LANES_WIDE_BLOCKS : TPC >= 4 ? 16 / TPC : 1;
}

inline bool lanes(const Params &p, bool forward, int batch) {
  const int choice = forward ? p.forward_kernel : p.backward_kernel;
  const int64_t least = forward ? MAMBAPEFT_SCAN_LANES_MIN : MAMBAPEFT_SCAN_LANES_BWD_MIN;
  return p.dstate <= 8 * lanes_states(forward) && (choice == 2 || (choice == 0 && int64_t(batch) * p.dim >= least));
}

// The lanes backward keeps each thread's states before every kLanesHalf steps: floats, 0 where it does not run.
inline int64_t lanes_backward_scratch(const Params &p, int batch) {
  if (!lanes(p, false, batch)) return 0;
  const int64_t blocks = int64_t(batch) * ((p.dim + 31) / 32), kept = (p.len + kLanesStage - 1) / kLanesStage *
                                                                        (kLanesStage / kLanesHalf);
  return blocks * kept * 32 * lanes_threads_per_channel(p, false, batch) * lanes_states_per_thread(p, false, batch);
}

// The forward (y, when not null, and the chunks' end states) or the backward kernel, on `stream`.
cudaError_t launch_f32(const Params &p, bool forward, int batch, cudaStream_t stream);
cudaError_t launch_bf16(const Params &p, bool forward, int batch, cudaStream_t stream);
cudaError_t launch_f16(const Params &p, bool forward, int batch, cudaStream_t stream);

}  // namespace mambapeft_scan
