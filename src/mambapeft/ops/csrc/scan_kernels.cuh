// The Mamba-1 selective scan as our own CUDA kernels, forward and backward, starting from an initial
// state and ending in a last state that both carry gradient. Built on first use by
// ops/scan_cuda_ext.py (torch.utils.cpp_extension); the Python side allocates every output and
// documents the shapes.
//
// Why: mamba_ssm's kernel takes no initial state, so affix tokens had to be extra positions (1024 + 3
// positions cost its 2048 template) or a carried correction (ops/scan_carry.py, about 0.7 ms a layer).
// Here the state is just where each chunk's scan starts, at no cost.
//
// Layout: one block per (batch row, channel), threads along time, K consecutive steps per thread,
// chunks of kNThreads * K steps (32 for a few steps, else up to 1024, 2048 beyond: scan.h) walked in
// order (forward) or reverse (backward). For each state n the
// recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(dt_t A_n), x_t = dt_t u_t B_nt) is a block scan of the
// affine maps (a, x): each thread composes its own K maps, a warp scan of those by shuffles, then the
// warps' totals through shared memory. Backward runs the forward scan again for h and a reverse scan
// for the gradient dh_t = C_nt dy_t + a_{t+1} dh_{t+1}, carried across chunks as a_t dh_t (which for
// the first step is the initial state's gradient). dB and dC sum over channels, i.e. over blocks:
// global float atomics, made coalesced by a transpose in each warp's shared memory.
//
// Both directions have a second layout (fwd_lanes_kernel here, scan_bwd_lanes.cuh), for up to 32 states where
// batch * channels fill the GPU (the 130m and 1.4b training shapes): threads along channels and states
// instead of time, each walking time in order. At those shapes the forward takes 22-44% less time than the
// block scan's, the backward about 0.6x (bench/results/issue13/); scan_launch.cuh picks (scan.h: lanes()).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include "scan.h"

// Tuning knobs, fixed at build time (bench/sweep_scan_ext.py builds variants to compare): steps per
// thread of the forward and of the backward kernel in chunks of 512 steps and more, and the most
// registers a backward thread may use (fewer: more blocks per SM, at the price of spills). On the H200
// the backward kernel was instruction- and latency-bound: 8 steps a thread at 128 registers beat 16
// steps (mamba_ssm's choice) by 10%; 8 steps at up to 255 registers took 1.6x as long.
#ifndef MAMBAPEFT_SCAN_ITEMS_FWD
#define MAMBAPEFT_SCAN_ITEMS_FWD 16
#endif
#ifndef MAMBAPEFT_SCAN_ITEMS_BWD
#define MAMBAPEFT_SCAN_ITEMS_BWD 8
#endif
#ifndef MAMBAPEFT_SCAN_BWD_REGS
#define MAMBAPEFT_SCAN_BWD_REGS 128
#endif

namespace mambapeft_scan {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// This thread's K steps from p (its first step); `valid` of them lie inside the sequence (others: 0).
// 16-byte loads when the host found every row aligned, all K steps are inside and fill whole loads.
template <typename T, int K>
__device__ __forceinline__ void load(const T *p, int valid, bool vec, float (&v)[K]) {
  constexpr int kPer = 16 / sizeof(T);
  if constexpr (K % kPer == 0) {
    if (vec && valid >= K) {
#pragma unroll
      for (int j = 0; j < K / kPer; ++j) {
        uint4 raw = reinterpret_cast<const uint4 *>(p)[j];
        const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
        for (int k = 0; k < kPer; ++k) v[j * kPer + k] = to_f(e[k]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = i < valid ? to_f(p[i]) : 0.f;
}

template <typename T, int K>
__device__ __forceinline__ void store(T *p, int valid, bool vec, const float (&v)[K]) {
  constexpr int kPer = 16 / sizeof(T);
  if constexpr (K % kPer == 0) {
    if (vec && valid >= K) {
#pragma unroll
      for (int j = 0; j < K / kPer; ++j) {
        uint4 raw;
        T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
        for (int k = 0; k < kPer; ++k) e[k] = from_f<T>(v[j * kPer + k]);
        reinterpret_cast<uint4 *>(p)[j] = raw;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (i < valid) p[i] = from_f<T>(v[i]);
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(__expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// An affine map h -> a h + b; then(p, q) applies p first.
struct Map { float a, b; };
__device__ __forceinline__ Map then(Map p, Map q) { return {p.a * q.a, q.a * p.b + q.b}; }
__device__ __forceinline__ Map shfl_up(Map m, int off) {
  return {__shfl_up_sync(0xffffffffu, m.a, off), __shfl_up_sync(0xffffffffu, m.b, off)};
}
__device__ __forceinline__ Map shfl_down(Map m, int off) {
  return {__shfl_down_sync(0xffffffffu, m.a, off), __shfl_down_sync(0xffffffffu, m.b, off)};
}

// h[i] = a[i] h[i-1] + x[i] over the block's kNThreads * K steps in time order, from h_in.
// -> the state after the last step. `totals` (kNThreads / 32 maps) must not be in use by another scan
// that a thread of this block may still be reading (the callers alternate two buffers).
template <int kNThreads, int K>
__device__ __forceinline__ float scan_forward(const float (&a)[K], const float (&x)[K], float h_in, float (&h)[K],
                                              Map *totals) {
  constexpr int kWarps = kNThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Map agg = {a[0], x[0]};
#pragma unroll
  for (int i = 1; i < K; ++i) agg = then(agg, {a[i], x[i]});
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    Map o = shfl_up(agg, off);
    if (lane >= off) agg = then(o, agg);
  }
  Map before = shfl_up(agg, 1);  // this thread's lanes before it
  if (lane == 0) before = {1.f, 0.f};
  float h_warp = h_in, h_end = h_in;
  if constexpr (kWarps == 1) {
    Map total = {__shfl_sync(0xffffffffu, agg.a, 31), __shfl_sync(0xffffffffu, agg.b, 31)};
    h_end = total.a * h_in + total.b;
  } else {
    if (lane == 31) totals[warp] = agg;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      Map t = totals[w];
      if (w < warp) h_warp = t.a * h_warp + t.b;
      h_end = t.a * h_end + t.b;
    }
  }
  float hh = before.a * h_warp + before.b;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    hh = a[i] * hh + x[i];
    h[i] = hh;
  }
  return h_end;
}

// The reverse scan of backward: dh[i] = g[i] + c[i+1], c[i] = a[i] dh[i], from the last step to the
// first, entering with c_in (a dh of the step after the block's steps). -> c of the block's first step.
template <int kNThreads, int K>
__device__ __forceinline__ float scan_reverse(const float (&a)[K], const float (&g)[K], float c_in, float (&dh)[K],
                                              Map *totals) {
  constexpr int kWarps = kNThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Map agg = {a[K - 1], a[K - 1] * g[K - 1]};  // c -> a (g + c)
#pragma unroll
  for (int i = K - 2; i >= 0; --i) agg = then(agg, {a[i], a[i] * g[i]});
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    Map o = shfl_down(agg, off);
    if (lane + off < 32) agg = then(o, agg);
  }
  Map after = shfl_down(agg, 1);  // the lanes after this one, applied first
  if (lane == 31) after = {1.f, 0.f};
  float c_warp = c_in, c_end = c_in;
  if constexpr (kWarps == 1) {
    Map total = {__shfl_sync(0xffffffffu, agg.a, 0), __shfl_sync(0xffffffffu, agg.b, 0)};
    c_end = total.a * c_in + total.b;
  } else {
    if (lane == 0) totals[warp] = agg;
    __syncthreads();
#pragma unroll
    for (int w = kWarps - 1; w >= 0; --w) {
      Map t = totals[w];
      if (w > warp) c_warp = t.a * c_warp + t.b;
      c_end = t.a * c_end + t.b;
    }
  }
  float c = after.a * c_warp + after.b;
#pragma unroll
  for (int i = K - 1; i >= 0; --i) {
    dh[i] = g[i] + c;
    c = a[i] * dh[i];
  }
  return c_end;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int kNThreads, int K, typename T>
__global__ void __launch_bounds__(kNThreads) fwd_kernel(Params p) {
  constexpr int kChunk = kNThreads * K, kWarps = kNThreads / 32;
  __shared__ Map totals[2][kWarps];
  extern __shared__ float h_run[];  // (N,): the state at the end of the previous chunk (first: the initial state)
  const int b = blockIdx.x, d = blockIdx.y, N = p.dstate;
  const T *u = static_cast<const T *>(p.u) + b * p.u_b + d * p.u_d;
  const T *delta = static_cast<const T *>(p.delta) + b * p.dt_b + d * p.dt_d;
  const T *z = p.z ? static_cast<const T *>(p.z) + b * p.z_b + d * p.z_d : nullptr;
  const T *Bp = static_cast<const T *>(p.B) + b * p.B_b, *Cp = static_cast<const T *>(p.C) + b * p.C_b;
  T *y = p.y ? static_cast<T *>(p.y) + b * p.y_b + d * p.y_d : nullptr;
  const float *A = p.A + d * N;
  const int64_t bd = int64_t(b) * p.dim + d;
  const float Dd = p.D ? p.D[d] : 0.f, bias = p.bias ? p.bias[d] : 0.f;
  for (int n = threadIdx.x; n < N; n += kNThreads) h_run[n] = p.h0 ? p.h0[bd * N + n] : 0.f;
  __syncthreads();
  for (int c = 0; c < p.n_chunks; ++c) {
    const int t0 = c * kChunk + threadIdx.x * K, valid = p.len - t0;
    float uv[K], dt[K], out[K], du[K];
    load<T, K>(u + t0, valid, p.vec, uv);
    load<T, K>(delta + t0, valid, p.vec, dt);
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const float raw = dt[i] + bias;
      dt[i] = i < valid ? (p.softplus ? softplus(raw) : raw) : 0.f;  // outside: a = 1, x = 0
      out[i] = Dd * uv[i];
      du[i] = dt[i] * uv[i];
    }
    for (int n = 0; n < N; ++n) {
      float Bv[K], Cv[K], a[K], x[K], h[K];
      load<T, K>(Bp + n * p.B_n + t0, valid, p.vec, Bv);
      load<T, K>(Cp + n * p.C_n + t0, valid, p.vec, Cv);
      const float An = A[n] * kLog2e;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        a[i] = exp2f(dt[i] * An);
        x[i] = du[i] * Bv[i];
      }
      const float h_in = h_run[n];
      const float h_end = scan_forward<kNThreads, K>(a, x, h_in, h, totals[n % 2]);
#pragma unroll
      for (int i = 0; i < K; ++i) out[i] += h[i] * Cv[i];
      // every thread has the same h_end and keeps its own copy (no barrier); it read h_run[n] before the
      // scan, which all threads pass together (a barrier, or the warp's shuffles and this __syncwarp)
      if constexpr (kWarps == 1) __syncwarp();
      h_run[n] = h_end;
      if (threadIdx.x == 0) p.states[(bd * p.n_states + c) * N + n] = h_end;
    }
    if (z && y) {
      float zv[K];
      load<T, K>(z + t0, valid, p.vec, zv);
#pragma unroll
      for (int i = 0; i < K; ++i) out[i] *= zv[i] * sigmoid(zv[i]);
    }
    if (y) store<T, K>(y + t0, valid, p.vec, out);
  }
}

// A thread's NS states' values from shared memory (16- or 8-byte reads where NS allows).
template <int NS>
__device__ __forceinline__ void load_states(const float *p, float (&v)[NS]) {
  if constexpr (NS % 4 == 0) {
#pragma unroll
    for (int q = 0; q < NS / 4; ++q) {
      const float4 x = reinterpret_cast<const float4 *>(p)[q];
      v[4 * q] = x.x, v[4 * q + 1] = x.y, v[4 * q + 2] = x.z, v[4 * q + 3] = x.w;
    }
  } else if constexpr (NS % 2 == 0) {
#pragma unroll
    for (int q = 0; q < NS / 2; ++q) {
      const float2 x = reinterpret_cast<const float2 *>(p)[q];
      v[2 * q] = x.x, v[2 * q + 1] = x.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < NS; ++j) v[j] = p[j];
  }
}

// Starts copying the lanes kernels' stage of kSteps steps from s0 into shared memory: the first n_rows of the
// rows of thread (c, r)'s channel into own[w][c] (its channel's TPC threads share them out), and B, then C (the
// first n_bc) of the block's batch row into bc[w], zeros for states past N. By cp.async where the stage is whole
// and the rows aligned, else by scalar loads with zeros past the sequence's end.
template <int TPC, typename T, int R, int kCh, int kPad, int NT, int kSteps>
__device__ __forceinline__ void lanes_stage_copy(T (&own)[R][kCh][kPad], T (&bc)[2][NT][kSteps], const T *const *rows,
                                                 int n_rows, int n_bc, const T *Bp, const T *Cp, const Params &p,
                                                 int s0, int c, int r) {
  constexpr int kVec = 16 / sizeof(T), kThreads = kCh * TPC;
  const int tid = threadIdx.x, N = p.dstate;
  if (p.vec && s0 + kSteps <= p.len) {
    for (int q = r; q < n_rows * (kSteps / kVec); q += TPC) {
      const int w = q / (kSteps / kVec), j = q % (kSteps / kVec) * kVec;
      if (rows[w]) __pipeline_memcpy_async(&own[w][c][j], rows[w] + s0 + j, 16);
    }
    for (int i = tid; i < n_bc * NT * (kSteps / kVec); i += kThreads) {
      const int w = i / (NT * (kSteps / kVec)), n = i / (kSteps / kVec) % NT, j = i % (kSteps / kVec) * kVec;
      if (n < N) __pipeline_memcpy_async(&bc[w][n][j], (w ? Cp + n * p.C_n : Bp + n * p.B_n) + s0 + j, 16);
      else *reinterpret_cast<uint4 *>(&bc[w][n][j]) = make_uint4(0, 0, 0, 0);
    }
  } else {
    for (int q = r; q < n_rows * kSteps; q += TPC) {
      const int w = q / kSteps, j = q % kSteps;
      if (rows[w]) own[w][c][j] = s0 + j < p.len ? rows[w][s0 + j] : from_f<T>(0.f);
    }
    for (int i = tid; i < n_bc * NT * kSteps; i += kThreads) {
      const int w = i / (NT * kSteps), n = i / kSteps % NT, j = i % kSteps;
      const T *src = w ? Cp + n * p.C_n : Bp + n * p.B_n;
      bc[w][n][j] = n < N && s0 + j < p.len ? src[s0 + j] : from_f<T>(0.f);
    }
  }
  __pipeline_commit();
}

// The lanes kernels' B (and with `with_c` C) rows of a stage as floats [t][n], in rows of kLanesRow floats
// (n < NT <= 32): a warp takes 8 steps of 4 states, so that its reads of bc's rows and its writes meet few bank
// conflicts (none or 2-way; a warp along the states of a step met 6-way ones at 24 states, 12-way at 32-step rows).
constexpr int kLanesRow = 36;
template <int NT, int kSteps, int kThreads, typename T>
__device__ __forceinline__ void lanes_bc_floats(const T (&bc)[2][NT][kSteps], float (&sB)[kSteps][kLanesRow],
                                                float (&sC)[kSteps][kLanesRow], bool with_c) {
  static_assert(NT % 4 == 0 && NT <= kLanesRow && kSteps % 8 == 0 && kThreads % 32 == 0, "8 steps of 4 states");
  for (int i = threadIdx.x; i < kSteps * NT; i += kThreads) {
    const int blk = i / 32, l = i % 32, t = blk % (kSteps / 8) * 8 + l % 8, n = blk / (kSteps / 8) * 4 + l / 8;
    sB[t][n] = to_f(bc[0][n][t]);
    if (with_c) sC[t][n] = to_f(bc[1][n][t]);
  }
}

// The forward with time walked in order by TPC threads per channel, each holding NS of its states in
// registers: no block scan. Per state and step: one exp2 and four multiply-adds; the TPC threads' sums
// over their states meet by warp shuffles. Few threads are in flight (batch * channels * TPC), so nothing
// may wait on memory: each stage of 64 bytes of a row (32 steps of bf16) is copied into shared memory
// asynchronously (cp.async) while the previous stage is scanned: the block's u, delta, z rows and its
// batch row's B and C. A stage is then three passes, split across the block's threads:
//   1. delta's softplus, dt u and B, C as floats [t][n] (one 16-byte read gives 4 states);
//   2. the scan, each thread along its channel and states, into the sums over states;
//   3. D u, z's gate and y's store, coalesced.
// The launcher uses it where batch * channels fill the GPU; states past N scan zeros.
template <int NS, int TPC, typename T>
__global__ void __launch_bounds__(32 * TPC) fwd_lanes_kernel(Params p) {
  constexpr int kCh = 32, kThreads = kCh * TPC, NT = NS * TPC;           // channels, threads, states per block
  constexpr int kVec = 16 / sizeof(T), kStage = 4 * kVec, kPad = kStage + kVec, kRow = kStage + 4;
  constexpr int kGroup = 4;  // steps scanned together
  static_assert(32 % kStage == 0, "every chunk (scan.h) but the last must be whole stages");
  __shared__ __align__(16) T own[2][3][kCh][kPad];  // [stage buffer][u, delta, z][channel][step]: padded rows
  __shared__ __align__(16) T bc[2][2][NT][kStage];   // [stage buffer][B, C][state][step]
  __shared__ __align__(16) float sB[kStage][kLanesRow], sC[kStage][kLanesRow];
  __shared__ __align__(16) float sdt[kCh][kRow], sdtu[kCh][kRow], sy[kCh][kRow];
  __shared__ float sbias[kCh], sD[kCh];
  const int b = blockIdx.x, N = p.dstate, tid = threadIdx.x, c = tid / TPC, r = tid % TPC, d0 = blockIdx.y * kCh;
  const int dd = min(d0 + c, p.dim - 1);  // a thread past the last channel reads a live row and stores nothing
  const T *rows[3] = {static_cast<const T *>(p.u) + b * p.u_b + dd * p.u_d,
                      static_cast<const T *>(p.delta) + b * p.dt_b + dd * p.dt_d,
                      p.z ? static_cast<const T *>(p.z) + b * p.z_b + dd * p.z_d : nullptr};
  const T *Bp = static_cast<const T *>(p.B) + b * p.B_b, *Cp = static_cast<const T *>(p.C) + b * p.C_b;
  const int64_t bd = int64_t(b) * p.dim + dd;
  const int chunk = p.state_chunk;  // the block scan's chunk, or the lanes backward's piece
  if (tid < kCh) {
    const int e = min(d0 + tid, p.dim - 1);
    sbias[tid] = p.bias ? p.bias[e] : 0.f;
    sD[tid] = p.D ? p.D[e] : 0.f;
  }

  auto fill = [&](int k, int s0) { lanes_stage_copy<TPC>(own[k], bc[k], rows, 3, 2, Bp, Cp, p, s0, c, r); };

  float h[NS], A2[NS];
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    const int n = r * NS + j;
    A2[j] = n < N ? p.A[dd * N + n] * kLog2e : 0.f;
    h[j] = n < N && p.h0 ? p.h0[bd * N + n] : 0.f;
  }
  int state_end = min(chunk, p.len);  // the step after which the next chunk's end state is written
  fill(0, 0);
  for (int s0 = 0, k = 0; s0 < p.len; s0 += kStage, k ^= 1) {
    __pipeline_wait_prior(0);
    __syncthreads();  // this stage's copies have landed; every thread is done with the previous stage
    if (s0 + kStage < p.len) fill(k ^ 1, s0 + kStage);
    const int steps = min(kStage, p.len - s0);
    for (int i = tid; i < kCh * kStage; i += kThreads) {  // 1.
      const int cc = i / kStage, t = i % kStage;
      const float raw = to_f(own[k][1][cc][t]) + sbias[cc], dt = t >= steps ? 0.f : p.softplus ? softplus(raw) : raw;
      sdt[cc][t] = dt;  // past the sequence's end: a = 1, x = 0 (the scan runs whole groups of kGroup steps)
      sdtu[cc][t] = dt * to_f(own[k][0][cc][t]);
    }
    lanes_bc_floats<NT, kStage, kThreads>(bc[k], sB, sC, true);
    __syncthreads();
    for (int t0 = 0; t0 < steps; t0 += kGroup) {  // 2.
      // a group's loads and exp2s are issued before its updates: step after step, each waited on its own
      float dt[kGroup], dtu[kGroup], a[kGroup][NS], Bv[kGroup][NS], Cv[kGroup][NS], sum[kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        dt[g] = sdt[c][t0 + g];
        dtu[g] = sdtu[c][t0 + g];
        load_states<NS>(&sB[t0 + g][r * NS], Bv[g]);
        load_states<NS>(&sC[t0 + g][r * NS], Cv[g]);
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g)
#pragma unroll
        for (int j = 0; j < NS; ++j) a[g][j] = exp2f(dt[g] * A2[j]);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float acc[2] = {0.f, 0.f};  // two chains of multiply-adds: states 0, 1 of each 4, and 2, 3
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          h[j] = fmaf(a[g][j], h[j], dtu[g] * Bv[g][j]);
          acc[j % 4 / 2] = fmaf(Cv[g][j], h[j], acc[j % 4 / 2]);
        }
        sum[g] = acc[0] + acc[1];
      }
#pragma unroll
      for (int o = 1; o < TPC; o *= 2)
#pragma unroll
        for (int g = 0; g < kGroup; ++g) sum[g] += __shfl_xor_sync(0xffffffffu, sum[g], o);
      if (r == 0) *reinterpret_cast<float4 *>(&sy[c][t0]) = make_float4(sum[0], sum[1], sum[2], sum[3]);
    }
    // chunks and pieces (scan.h) are whole stages but for the sequence's last, ragged one; a branch per step here
    // would keep the compiler from overlapping consecutive steps
    if (s0 + steps == state_end) {
      if (d0 + c < p.dim) {
        float *st = p.states + (bd * p.n_states + (state_end - 1) / chunk) * N + r * NS;
#pragma unroll
        for (int j = 0; j < NS; ++j)
          if (r * NS + j < N) st[j] = h[j];
      }
      state_end = min(state_end + chunk, p.len);
    }
    if (!p.y) continue;
    __syncthreads();
    for (int i = tid; i < kCh * kStage; i += kThreads) {  // 3.
      const int cc = i / kStage, t = i % kStage, e = d0 + cc;
      if (t >= steps || e >= p.dim) continue;
      float out = sy[cc][t] + sD[cc] * to_f(own[k][0][cc][t]);
      if (rows[2]) {
        const float zv = to_f(own[k][2][cc][t]);
        out *= zv * sigmoid(zv);
      }
      static_cast<T *>(p.y)[b * p.y_b + e * p.y_d + s0 + t] = from_f<T>(out);
    }
  }
}

// Adds this warp's K pairs per lane (lane l holds steps base + l K .. + K - 1) into dB[base ...] and
// dC[base ...], transposed through `tile` so that each atomic instruction of the warp covers 32
// consecutive steps; no bounds checks when all of the warp's steps are inside.
template <int K>
__device__ __forceinline__ void add_coalesced(float *dB, float *dC, int base, int len, const float (&vb)[K],
                                              const float (&vc)[K], float2 *tile) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < K; ++i) tile[lane * (K + 1) + i] = make_float2(vb[i], vc[i]);
  __syncwarp();
  const bool full = base + 32 * K <= len;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int s = i * 32 + lane;  // the warp's s-th step: written by lane s / K as its item s % K
    const float2 v = tile[(s / K) * (K + 1) + s % K];
    if (full || base + s < len) {
      atomicAdd(dB + base + s, v.x);
      atomicAdd(dC + base + s, v.y);
    }
  }
  __syncwarp();
}

template <int kNThreads, int K, typename T>
__global__ void __launch_bounds__(kNThreads, 65536 / (kNThreads * MAMBAPEFT_SCAN_BWD_REGS) > 0
                                                 ? 65536 / (kNThreads * MAMBAPEFT_SCAN_BWD_REGS) : 1)
    bwd_kernel(Params p) {
  constexpr int kChunk = kNThreads * K, kWarps = kNThreads / 32;
  __shared__ Map totals[2][2][kWarps];
  __shared__ float2 tiles[kWarps][32 * (K + 1)];
  __shared__ float partial[2][kWarps];
  extern __shared__ float smem[];  // launch(): (3 + kWarps) N floats
  // (N,) each: the reverse scan's carry, the chunk's starting state (read once a chunk, not from global
  // memory in every state's loop), then (kWarps, N): each warp's sum for dA (no shared atomics, which
  // are a compare-and-swap loop for floats)
  float *c_run = smem, *h_start = smem + p.dstate, *dA_acc = smem + 2 * p.dstate;
  const int b = blockIdx.x, d = blockIdx.y, N = p.dstate, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T *u = static_cast<const T *>(p.u) + b * p.u_b + d * p.u_d;
  const T *delta = static_cast<const T *>(p.delta) + b * p.dt_b + d * p.dt_d;
  const T *z = p.z ? static_cast<const T *>(p.z) + b * p.z_b + d * p.z_d : nullptr;
  const T *dout = p.dout ? static_cast<const T *>(p.dout) + b * p.do_b + d * p.do_d : nullptr;
  const T *Bp = static_cast<const T *>(p.B) + b * p.B_b, *Cp = static_cast<const T *>(p.C) + b * p.C_b;
  T *du_out = static_cast<T *>(p.du) + b * p.du_b + d * p.du_d;
  T *ddt_out = static_cast<T *>(p.ddelta) + b * p.ddt_b + d * p.ddt_d;
  T *dz_out = p.dz ? static_cast<T *>(p.dz) + b * p.dz_b + d * p.dz_d : nullptr;
  T *oz_out = p.out_z ? static_cast<T *>(p.out_z) + b * p.oz_b + d * p.oz_d : nullptr;
  float *dB = p.dB + int64_t(b) * N * p.len, *dC = p.dC + int64_t(b) * N * p.len;
  const float *A = p.A + d * N;
  const int64_t bd = int64_t(b) * p.dim + d;
  const float Dd = p.D ? p.D[d] : 0.f, bias = p.bias ? p.bias[d] : 0.f;
  for (int n = threadIdx.x; n < N; n += kNThreads) c_run[n] = p.dlast ? p.dlast[bd * N + n] : 0.f;
  for (int i = threadIdx.x; i < kWarps * N; i += kNThreads) dA_acc[i] = 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;
  for (int c = p.n_chunks - 1; c >= 0; --c) {
    __syncthreads();  // the previous chunk's reads of h_start are done (and c_run, dA_acc are set)
    for (int n = threadIdx.x; n < N; n += kNThreads)
      h_start[n] = c > 0 ? p.states[(bd * p.n_states + c - 1) * N + n] : (p.h0 ? p.h0[bd * N + n] : 0.f);
    __syncthreads();
    const int t0 = c * kChunk + threadIdx.x * K, valid = p.len - t0;
    // kept through the loop over states: u, dt, the ungated output's gradient dy, the output y (for
    // z's gradient), and the sums du, ddt; z and the raw delta are loaded again at the end
    float uv[K], dt[K], dy[K], yv[K], du[K], ddt[K];
    load<T, K>(u + t0, valid, p.vec, uv);
    load<T, K>(delta + t0, valid, p.vec, dt);
    if (dout) load<T, K>(dout + t0, valid, p.vec, dy);
    if (z) {
      float zv[K];
      load<T, K>(z + t0, valid, p.vec, zv);
#pragma unroll
      for (int i = 0; i < K; ++i) dy[i] *= zv[i] * sigmoid(zv[i]);
    }
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const float raw = dt[i] + bias;
      dt[i] = i < valid ? (p.softplus ? softplus(raw) : raw) : 0.f;
      if (!dout) dy[i] = 0.f;
      yv[i] = Dd * uv[i];
      du[i] = Dd * dy[i];
      ddt[i] = 0.f;
      dD_acc += dy[i] * uv[i];
    }
    for (int n = 0; n < N; ++n) {
      float a[K], x[K], h[K], g[K], dh[K], Bv[K];
      load<T, K>(Bp + n * p.B_n + t0, valid, p.vec, Bv);
      const float A_n = A[n], An = A_n * kLog2e;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        a[i] = exp2f(dt[i] * An);
        x[i] = dt[i] * uv[i] * Bv[i];
      }
      scan_forward<kNThreads, K>(a, x, h_start[n], h, totals[n % 2][0]);
      {
        float Cv[K];
        load<T, K>(Cp + n * p.C_n + t0, valid, p.vec, Cv);
#pragma unroll
        for (int i = 0; i < K; ++i) {
          yv[i] += h[i] * Cv[i];
          g[i] = Cv[i] * dy[i];
        }
      }
      const float c_end = scan_reverse<kNThreads, K>(a, g, c_run[n], dh, totals[n % 2][1]);
      float dA_loc = 0.f;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const float ah = h[i] - x[i];  // a_t h_{t-1}, without a division
        const float dhdt = dh[i] * dt[i];
        ddt[i] = fmaf(dh[i], fmaf(A_n, ah, Bv[i] * uv[i]), ddt[i]);
        du[i] = fmaf(dhdt, Bv[i], du[i]);
        dA_loc = fmaf(dhdt, ah, dA_loc);
        g[i] = dhdt * uv[i];  // now dB's terms
        h[i] *= dy[i];        // now dC's terms
      }
      dA_loc = warp_sum(dA_loc);
      if (lane == 0) dA_acc[warp * N + n] += dA_loc;
      add_coalesced<K>(dB + n * p.len, dC + n * p.len, c * kChunk + warp * 32 * K, p.len, g, h, tiles[warp]);
      if constexpr (kWarps == 1) __syncwarp();
      c_run[n] = c_end;   // as h_run in the forward: the same value in every thread, each reading its own
    }
    if (z) {
      float zv[K], dg[K];
      load<T, K>(z + t0, valid, p.vec, zv);
      if (dout) load<T, K>(dout + t0, valid, p.vec, dg);
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const float sz = sigmoid(zv[i]);
        dg[i] = dout ? dg[i] * yv[i] * sz * (1.f + zv[i] * (1.f - sz)) : 0.f;  // now z's gradient
        zv[i] = yv[i] * zv[i] * sz;                                             // now the gated output
      }
      store<T, K>(dz_out + t0, valid, p.vec, dg);
      if (oz_out) store<T, K>(oz_out + t0, valid, p.vec, zv);
    } else if (oz_out) {
      store<T, K>(oz_out + t0, valid, p.vec, yv);
    }
    {
      float raw[K];
      load<T, K>(delta + t0, valid, p.vec, raw);
#pragma unroll
      for (int i = 0; i < K; ++i) {
        if (p.softplus) ddt[i] *= sigmoid(raw[i] + bias);
        if (i < valid) dbias_acc += ddt[i];
      }
    }
    store<T, K>(du_out + t0, valid, p.vec, du);
    store<T, K>(ddt_out + t0, valid, p.vec, ddt);
  }
  __syncthreads();
  for (int n = threadIdx.x; n < N; n += kNThreads) {
    p.dh0[bd * N + n] = c_run[n];
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += dA_acc[w * N + n];
    atomicAdd(p.dA + d * N + n, sum);
  }
  dD_acc = warp_sum(dD_acc);
  dbias_acc = warp_sum(dbias_acc);
  if (lane == 0) {
    partial[0][warp] = dD_acc;
    partial[1][warp] = dbias_acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s0 = 0.f, s1 = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      s0 += partial[0][w];
      s1 += partial[1][w];
    }
    if (p.dD) atomicAdd(p.dD + d, s0);
    if (p.dbias) atomicAdd(p.dbias + d, s1);
  }
}

}  // namespace mambapeft_scan
