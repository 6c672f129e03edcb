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
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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
  extern __shared__ float h_run[];  // (N,): the state at the end of the previous chunk
  const int b = blockIdx.x, d = blockIdx.y, N = p.dstate;
  const T *u = static_cast<const T *>(p.u) + b * p.u_b + d * p.u_d;
  const T *delta = static_cast<const T *>(p.delta) + b * p.dt_b + d * p.dt_d;
  const T *z = p.z ? static_cast<const T *>(p.z) + b * p.z_b + d * p.z_d : nullptr;
  const T *Bp = static_cast<const T *>(p.B) + b * p.B_b, *Cp = static_cast<const T *>(p.C) + b * p.C_b;
  T *y = p.y ? static_cast<T *>(p.y) + b * p.y_b + d * p.y_d : nullptr;
  const float *A = p.A + d * N;
  const int64_t bd = int64_t(b) * p.dim + d;
  const float Dd = p.D ? p.D[d] : 0.f, bias = p.bias ? p.bias[d] : 0.f;
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
      const float h_in = c > 0 ? h_run[n] : (p.h0 ? p.h0[bd * N + n] : 0.f);
      const float h_end = scan_forward<kNThreads, K>(a, x, h_in, h, totals[n % 2]);
#pragma unroll
      for (int i = 0; i < K; ++i) out[i] += h[i] * Cv[i];
      // every thread has the same h_end and keeps its own copy (no barrier); it read h_run[n] before the
      // scan, which all threads pass together (a barrier, or the warp's shuffles and this __syncwarp)
      if constexpr (kWarps == 1) __syncwarp();
      h_run[n] = h_end;
      if (threadIdx.x == 0) p.states[(bd * p.n_chunks + c) * N + n] = h_end;
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
  extern __shared__ float smem[];
  float *c_run = smem, *dA_acc = smem + p.dstate;  // (N,) each
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
  for (int n = threadIdx.x; n < N; n += kNThreads) {
    c_run[n] = p.dlast ? p.dlast[bd * N + n] : 0.f;
    dA_acc[n] = 0.f;
  }
  __syncthreads();
  float dD_acc = 0.f, dbias_acc = 0.f;
  for (int c = p.n_chunks - 1; c >= 0; --c) {
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
      const float h_in = c > 0 ? p.states[(bd * p.n_chunks + c - 1) * N + n] : (p.h0 ? p.h0[bd * N + n] : 0.f);
      scan_forward<kNThreads, K>(a, x, h_in, h, totals[n % 2][0]);
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
      if (lane == 0) atomicAdd(dA_acc + n, dA_loc);
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
    atomicAdd(p.dA + d * N + n, dA_acc[n]);
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

template <typename T>
cudaError_t launch(const Params &p, bool forward, int batch, cudaStream_t stream) {
  auto go = [&](auto kernel, int threads) {
    const size_t smem = (forward ? 1 : 2) * p.dstate * sizeof(float);
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
