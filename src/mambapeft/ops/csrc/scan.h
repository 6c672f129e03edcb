// What the host side hands the kernels (scan_kernels.cuh); one launcher per input dtype (scan_*.cu).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace mambapeft_scan {

struct Params {
  int dim, len, dstate, n_chunks;
  bool softplus, vec;
  int forward_kernel;  // 0: the launcher's choice, 1: the block scan, 2: threads along channels and states (N <= 16)
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
};

// Steps per chunk: one chunk up to 1024 steps (as mamba_ssm's templates), 2048-step chunks beyond; a
// one-warp chunk of 32 for a few steps (affix tokens).
__host__ __device__ inline int chunk_size(int len) {
  return len <= 32 ? 32 : len <= 256 ? 256 : len <= 512 ? 512 : len <= 1024 ? 1024 : 2048;
}

// The forward (y, when not null, and the chunks' end states) or the backward kernel, on `stream`.
cudaError_t launch_f32(const Params &p, bool forward, int batch, cudaStream_t stream);
cudaError_t launch_bf16(const Params &p, bool forward, int batch, cudaStream_t stream);
cudaError_t launch_f16(const Params &p, bool forward, int batch, cudaStream_t stream);

}  // namespace mambapeft_scan
