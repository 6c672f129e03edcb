// What the host side hands the kernels (scan_kernels.cuh); one launcher per input dtype (scan_*.cu).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cuda_runtime.h>

namespace mambapeft_scan {

struct Params {
  int dim, len, dstate, n_chunks;  // n_chunks: the block scan's (chunk_size)
  // the forward's kept states: n_states a channel, one after every state_chunk steps (the block scan's chunks,
  // or the lanes backward's pieces of time: lanes_pieces); the lanes backward's pieces (1: the whole sequence)
  int n_states, state_chunk, pieces;
  bool softplus, vec;
  // 0: the launcher's choice, 1: the block scan, 2: threads along channels and states (N <= 32)
  int forward_kernel, backward_kernel;
  // (b, E, L) tensors with time contiguous: batch and channel strides in elements
  const void *u, *delta, *z, *dout;
  int64_t u_b, u_d, dt_b, dt_d, z_b, z_d, do_b, do_d;
  const void *B, *C;  // (b, N, L)
  int64_t B_b, B_n, C_b, C_n;
  const float *A, *D, *bias, *h0, *dlast;  // A (E, N); D, bias (E,); h0, dlast (b, E, N)
  float *states;                            // (b, E, n_states, N): the state at each chunk's or piece's end
  void *y, *du, *ddelta, *dz, *out_z;       // outputs (b, E, L)
  int64_t y_b, y_d, du_b, du_d, ddt_b, ddt_d, dz_b, dz_d, oz_b, oz_d;
  float *dA, *dB, *dC, *dD, *dbias, *dh0;   // dA (E, N), dB, dC (b, N, L) contiguous, dh0 (b, E, N)
  float *scratch;                           // the backward along channels: lanes_backward_scratch() floats
  int *sync;  // with pieces: zeros, a flag an item (lanes_backward_sync)
};

// Steps per chunk: one chunk up to 1024 steps (as mamba_ssm's templates), 2048-step chunks beyond; a
// one-warp chunk of 32 for a few steps (affix tokens).
__host__ __device__ inline int chunk_size(int len) {
  return len <= 32 ? 32 : len <= 256 ? 256 : len <= 512 ? 512 : len <= 1024 ? 1024 : 2048;
}

// the block scan's chunks of a sequence (the last may be shorter)
inline int chunks_of(int len) { return (len + chunk_size(len) - 1) / chunk_size(len); }

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

// the lanes kernels' blocks: a batch row's 32 channels each
inline int64_t lanes_blocks(const Params &p, int batch) { return int64_t(batch) * ((p.dim + 31) / 32); }

// Whether a channel's 4 threads hold 1.5x lanes_states each rather than 8 threads lanes_states: 17 to 24 states
// (Additional-scan's 22) then take as many threads as 16, and the state slots are 24, not 32 (8 threads of 3
// states were no faster than 8 of 4: threads add work of their own, a channel's loads, sums and shuffles).
inline bool lanes_wide_states(const Params &p, bool forward) {
  const int S = lanes_states(forward);
  return MAMBAPEFT_SCAN_LANES_WIDE && S % 2 == 0 && p.dstate > 4 * S && p.dstate <= 6 * S;
}

// The wide layout, forward always; the backward up to 2048 steps (where it can run in pieces: lanes_pieces) or
// where its blocks fit the GPU at once (WIDE_BLOCKS an SM). 8 threads of 4 hold fewer channels at once (2 blocks
// of 256 threads an SM, against 3 of 128). Backward at 22 states, against 8 threads of 4 (s13/sweep_wide_waves.txt):
// 8 x 3072 x 1024 (two full rounds) 1.67 ms to 2.35, 4 x 4096 x 2048 whole 2.58 to 3.06, in 3 pieces 2.30.
inline bool lanes_wide(const Params &p, bool forward, int batch) {
  if (!lanes_wide_states(p, forward)) return false;
  return forward || p.len <= 2048 || lanes_blocks(p, batch) <= int64_t(MAMBAPEFT_SCAN_LANES_WIDE_BLOCKS) * sm_count();
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

// Pieces of time for the lanes backward in the wide layout. Each thread walks its channel's whole sequence, so
// where the blocks overflow what the GPU holds at once (the 1.4b shape's 22 states: 512 blocks, 3 an SM on 132
// SMs) a second round of whole sequences runs on a quarter of the GPU. Cut into k pieces, the latest piece of
// every block runs first, each item waiting on the gradient the next piece's item carries over (started a round
// earlier, so nothing waits): ceil(k blocks / places) / k rounds of a whole sequence's time instead of 2 (k = 3 at
// the 1.4b shape: 1.33). The forward keeps the state before each piece (n_states = pieces). Up to 2048 steps (one
// chunk of the block scan, whose backward then reads no kept state), pieces of at least kPieceMin steps, whole
// stages of both kernels. Not for 4 states a thread (4 blocks an SM): in 2 pieces the backward took 1.36 against
// 1.28 ms whole at 8 x 3072 x 16 x 1024 (bench/results/issue13/s13/sweep_pieces_shapes.txt).
#ifndef MAMBAPEFT_SCAN_LANES_PIECES
#define MAMBAPEFT_SCAN_LANES_PIECES 4  // the most pieces; 1: none
#endif
constexpr int kPieceMin = 256;

// steps a piece of `pieces` (the last may be shorter)
inline int piece_len(int len, int pieces) { return ((len + pieces - 1) / pieces + 31) / 32 * 32; }

// the pieces that piece_len(len, k) makes of len
inline int pieces_of(int len, int k) { return (len + piece_len(len, k) - 1) / piece_len(len, k); }

// Whether the lanes backward can run in pieces here: it runs, in the wide layout, up to 2048 steps.
inline bool lanes_pieces_ok(const Params &p, int batch) {
  return p.len <= 2048 && lanes(p, false, batch) && lanes_wide_states(p, false);
}

// The pieces the lanes backward would run in at this shape (p.dim, dstate, len, forward_kernel, backward_kernel
// set): `request` of them where given (> 0), else where the whole sequence's last round would be less than half
// full, the fewest of those up to MAMBAPEFT_SCAN_LANES_PIECES that take the least time by the rounds above; 1 where
// the sequence runs whole. (A round of fewer blocks an SM runs faster: at 4 x 5120 channels, whole, the second
// round is 62% full, and 3 pieces took 2.84 ms against 2.80 whole; at 4 x 4096, 29% full, 2.30 against 2.58.)
inline int lanes_pieces(const Params &p, int batch, int request) {
  if (!lanes(p, true, batch) || !lanes_pieces_ok(p, batch)) return 1;
  if (request > 0) return pieces_of(p.len, std::min(request, (p.len + 31) / 32));
  const int64_t blocks = lanes_blocks(p, batch),
                places = int64_t(lanes_backward_blocks(lanes_ns(lanes_states(false), true), 4)) * sm_count();
  if (blocks <= places || blocks % places * 2 >= places) return 1;
  int best = 1;
  for (int k = 2; k <= MAMBAPEFT_SCAN_LANES_PIECES && piece_len(p.len, k) >= kPieceMin; ++k)
    if ((k * blocks + places - 1) / places * best < (best * blocks + places - 1) / places * k) best = k;
  return pieces_of(p.len, best);
}

// The lanes backward's flags (an item's carry is in place): 0 without pieces.
inline int64_t lanes_backward_sync(const Params &p, int batch) {
  return p.pieces > 1 ? lanes_blocks(p, batch) * p.pieces : 0;
}

// The lanes backward keeps each thread's states before every kLanesHalf steps: floats, 0 where it does not run.
inline int64_t lanes_backward_scratch(const Params &p, int batch) {
  if (!lanes(p, false, batch)) return 0;
  const int64_t kept = (p.len + kLanesStage - 1) / kLanesStage * (kLanesStage / kLanesHalf);
  return lanes_blocks(p, batch) * kept * 32 * lanes_threads_per_channel(p, false, batch) *
         lanes_states_per_thread(p, false, batch);
}

// The forward (y, when not null, and the chunks' end states) or the backward kernel, on `stream`.
cudaError_t launch_f32(const Params &p, bool forward, int batch, cudaStream_t stream);
cudaError_t launch_bf16(const Params &p, bool forward, int batch, cudaStream_t stream);
cudaError_t launch_f16(const Params &p, bool forward, int batch, cudaStream_t stream);

}  // namespace mambapeft_scan
