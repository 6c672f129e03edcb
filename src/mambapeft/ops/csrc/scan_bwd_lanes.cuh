// The backward along channels and states (the layout of fwd_lanes_kernel): TPC threads per channel, NS of
// its states each in registers, every thread walking time itself.
//
// Why: the block scan's backward spends about 100 instructions per state and step on its two block scans
// (affine maps composed, shuffled, passed through shared memory) and one global atomic per channel, state
// and step for dB and dC. Here a step costs a thread two exp2s and a dozen multiply-adds per state, and
// dB, dC meet over the warp's channels in shared memory first: one 16-byte atomic per warp, state and 4
// steps (two 8-byte ones where two lanes share a state's steps); with 4 threads of 6 states, over the
// block's channels: one 16-byte atomic per block, state and 4 steps (kBlockSums).
//
// With pieces of time (scan.h: lanes_pieces) a block is an item, a block of channels and a piece: its walk
// starts from the forward's state before the piece, and its carried gradient from the one the item of the next
// piece left in dh0 (the last piece: dlast).
//
// A thread's walk: first forward over the whole sequence from the initial state, keeping its state
// before every kLanesHalf (8) steps in p.scratch (the forward kept only the chunks' ends); then stage by
// stage from the last, each half-stage's 8 states again (registers), then its steps in reverse:
//   dh_t = C_t dy_t + a_{t+1} dh_{t+1}, carried as c = a_t dh_t (after the first step: the initial
//   state's gradient), with a_t = exp(dt_t A), dy the ungated output's gradient;
//   ddt_t = sum_n dh (A a_t h_{t-1} + B u), du_t = dt sum_n dh B + D dy, dA_n = sum_t dh dt a_t h_{t-1},
//   dB_nt = sum_d dh dt u, dC_nt = sum_d dy h_t.
// A stage (kLanesStage, 16 steps) of the block's u, delta, z and dout rows and its batch row's B and C is copied
// into shared memory by cp.async while the one after it (in time) is worked on, then three passes:
//   1. softplus, dt u, the ungated dy and B, C as floats [t][n];
//   2. the scan above, into the sums over states (S1 = sum dh A a h_{t-1}, S2 = sum dh B, S3 = y);
//   3. du, ddelta, dz and the gated output from those, a thread's 16 / TPC steps of a channel stored at once; D's
//      and delta_bias' sums.
#pragma once
#include <type_traits>

#include "scan_kernels.cuh"

namespace mambapeft_scan {

// Adds K (4 or 2) consecutive steps' sums at p (t of them inside the row; p 4K-byte aligned when `vec`).
template <int K>
__device__ __forceinline__ void add_steps(float *p, int t, bool vec, const float (&v)[K]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (vec && t >= K) {
    if constexpr (K == 4) atomicAdd(reinterpret_cast<float4 *>(p), make_float4(v[0], v[1], v[2], v[3]));
    else atomicAdd(reinterpret_cast<float2 *>(p), make_float2(v[0], v[1]));
    return;
  }
#endif
#pragma unroll
  for (int g = 0; g < K; ++g)
    if (g < t) atomicAdd(p + g, v[g]);
}

// K consecutive values of T, moved in kCount chunks V of 16, 8 or 4 bytes
template <typename T, int K>
struct StepChunks {
  static constexpr int kBytes = K * sizeof(T), kChunk = kBytes < 16 ? kBytes : 16, kCount = kBytes / kChunk;
  using V = std::conditional_t<kChunk == 16, uint4, std::conditional_t<kChunk == 8, uint2, uint32_t>>;
};

// Writes K consecutive steps' values to dst (n of them inside the row), a chunk at a time where dst is aligned.
template <typename T, int K>
__device__ __forceinline__ void store_steps(T *dst, const float (&v)[K], int n) {
  using W = StepChunks<T, K>;
  if (n >= K && reinterpret_cast<uintptr_t>(dst) % W::kChunk == 0) {
    __align__(16) T tmp[K];
#pragma unroll
    for (int k = 0; k < K; ++k) tmp[k] = from_f<T>(v[k]);
#pragma unroll
    for (int q = 0; q < W::kCount; ++q)
      reinterpret_cast<typename W::V *>(dst)[q] = reinterpret_cast<const typename W::V *>(tmp)[q];
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < n) dst[k] = from_f<T>(v[k]);
  }
}

// v = K consecutive values of T from shared memory at p, a chunk at a time (p aligned to a chunk)
template <typename T, int K>
__device__ __forceinline__ void load_steps(const T *p, float (&v)[K]) {
  using W = StepChunks<T, K>;
  __align__(16) T tmp[K];
#pragma unroll
  for (int q = 0; q < W::kCount; ++q)
    reinterpret_cast<typename W::V *>(tmp)[q] = reinterpret_cast<const typename W::V *>(p)[q];
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = to_f(tmp[k]);
}

template <int NS, int TPC, typename T>
struct BwdLanesSmem {
  static constexpr int kCh = 32, NT = NS * TPC, kWarps = TPC, kWCh = 32 / TPC, kS = kLanesStage, kG = 4;
  // rows of red: the channels of a warp and a pad that spreads its thread ranks' stores over the 32 banks; 12
  // for 4 threads of 6 states also lets the sums read a row's channels 4 at a time without bank conflicts
  static constexpr int kVec = 16 / sizeof(T), kPad = kS + kVec, kRow = kS + 4;
  static constexpr int kTile = TPC == 8 ? 5 : TPC == 4 && NS == 6 ? 12 : kWCh + 2;
  __align__(16) T own[2][4][kCh][kPad];  // [buffer][u, delta, z, dout][channel][step]
  __align__(16) T bc[2][2][NT][kS];      // [buffer][B, C][state][step]
  __align__(16) float sB[kS][kLanesRow], sC[kS][kLanesRow];  // lanes_bc_floats
  __align__(16) float sdt[kCh][kRow], sdtu[kCh][kRow], sdy[kCh][kRow];
  // rows of kS: pass 3 reads 4 steps of each of 8 channels a warp, two channels a quarter-warp, conflict-free
  __align__(16) float s1[kCh][kS], s2[kCh][kS], s3[kCh][kS];
  // each warp's dB, dC terms of a group of kG steps: [warp][step][dB, dC][state][channel of the warp]
  __align__(16) float red[kWarps][kG][2][NT][kTile];
  float sbias[kCh], sD[kCh];
  int s_begin, item;  // the item's first stage; its flag (p.sync)
};

// v[g] = item i's term of step g0 + g, summed over the warp's channels (a row of red)
template <typename S, int K>
__device__ __forceinline__ void channel_sums(const float (&red)[S::kG][2][S::NT][S::kTile], int i, int g0,
                                             float (&v)[K]) {
#pragma unroll
  for (int g = 0; g < K; ++g) {
    const float *row = red[g0 + g][i / S::NT][i % S::NT];
    float acc = 0.f;
    if constexpr (S::kTile % 4 == 0) {
#pragma unroll
      for (int q = 0; q < S::kWCh / 4; ++q) {
        const float4 x = reinterpret_cast<const float4 *>(row)[q];
        acc += (x.x + x.y) + (x.z + x.w);
      }
    } else if constexpr (S::kTile % 2 == 0) {
#pragma unroll
      for (int q = 0; q < S::kWCh / 2; ++q) {
        const float2 x = reinterpret_cast<const float2 *>(row)[q];
        acc += x.x + x.y;
      }
    } else {
#pragma unroll
      for (int q = 0; q < S::kWCh; ++q) acc += row[q];
    }
    v[g] = acc;
  }
}

// scan.h: lanes_backward_blocks caps its registers. kPieces: an item is a piece of time (a kernel of its own: in
// the whole sequence's kernel, the pieces' code made the 16-state one spill)
template <int NS, int TPC, typename T, bool kPieces>
__global__ void __launch_bounds__(32 * TPC, lanes_backward_blocks(NS, TPC)) bwd_lanes_kernel(Params p) {
  using S = BwdLanesSmem<NS, TPC, T>;
  constexpr int kCh = S::kCh, kThreads = kCh * TPC, NT = S::NT, kS = S::kS, kG = S::kG;
  constexpr int kH = kLanesHalf, kHalves = kS / kH, kItems = kCh * kS / kThreads;
  constexpr float kLn2 = 0.6931471805599453f;
  // A warp's 2 NT dB and dC items of a group: kWhole of them a lane each, then up to 16 left over (16 of 48 at
  // 24 states) shared by two lanes, 2 steps each, rather than a second round with half its lanes idle. The two
  // are lanes l and l + kTail: a quarter-warp's lanes then read rows of one step, without bank conflicts (an
  // item's two steps are 2 x 2 NT kTile floats apart, the same banks: 2l and 2l + 1 conflicted)
  constexpr int kTail = 2 * NT % 32 <= 16 ? 2 * NT % 32 : 0, kWhole = 2 * NT - kTail;
  // 4 threads of 6 states (lanes_wide): the warps' sums of an item and group meet over the block's channels
  // first, for one 16-byte atomic a block rather than one a warp (the atomics took 17% of this backward's
  // time; elsewhere the barrier cost more than they did, also with one barrier a group at 8 threads of 4
  // states: bench/results/issue13/s12). A warp's sums go to
  // the 4 unused floats at the end of its rows of red (kTile 12 for 8 channels), in two buffers taken by
  // turns, so that one barrier a group suffices: a buffer is written again only after the next barrier.
  constexpr bool kBlockSums = TPC == 4 && NS > 4;
  static_assert(!kBlockSums || (S::kTile - S::kWCh >= 4 && S::kTile % 4 == 0 && 4 * NT <= kG * 2 * NT &&
                                kLanesHalf / kG % 2 == 0), "the block's sums: rows, room and turns");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  S &sm = *reinterpret_cast<S *>(smem_raw);
  // item i's slot of warp w in buffer `buf`: row buf * 2 NT + i of the warp's red, past its channels
  auto sum_slot = [&](int w, int buf, int i) {
    return reinterpret_cast<float4 *>(&sm.red[w][0][0][0][0] + (buf * 2 * NT + i) * S::kTile + S::kWCh);
  };
  // the item's piece: the latest first (blockIdx.z 0), so that the item of the piece after it, whose carry it waits
  // for, was started before it (blocks start in the order of their index, as CUB's single-pass scans rely on)
  const int b = blockIdx.x, N = p.dstate, tid = threadIdx.x, c = tid / TPC, r = tid % TPC, d0 = blockIdx.y * kCh;
  const int lane = tid % 32, warp = tid / 32, cl = lane / TPC, piece = kPieces ? p.pieces - 1 - blockIdx.z : 0;
  const int blk = b * gridDim.y + blockIdx.y;
  const bool live = d0 + c < p.dim;
  const int dd = min(d0 + c, p.dim - 1);  // a thread past the last channel reads a live row; its terms are zeroed
  const T *rows[4] = {static_cast<const T *>(p.u) + b * p.u_b + dd * p.u_d,
                      static_cast<const T *>(p.delta) + b * p.dt_b + dd * p.dt_d,
                      p.z ? static_cast<const T *>(p.z) + b * p.z_b + dd * p.z_d : nullptr,
                      p.dout ? static_cast<const T *>(p.dout) + b * p.do_b + dd * p.do_d : nullptr};
  const T *Bp = static_cast<const T *>(p.B) + b * p.B_b, *Cp = static_cast<const T *>(p.C) + b * p.C_b;
  const int64_t bd = int64_t(b) * p.dim + dd;
  // the sequence's stages; the item's: [s_begin, s_end)
  const int n_st = (p.len + kS - 1) / kS, s_begin = piece * p.state_chunk / kS;
  const int s_end = kPieces ? min(n_st, s_begin + p.state_chunk / kS) : n_st;
  if (kPieces && tid == 0) {  // read again where needed: registers less through the reverse walk
    sm.s_begin = s_begin;
    sm.item = blk * p.pieces + piece;
  }
  float *ck = p.scratch + int64_t(blk) * n_st * kHalves * NS * kThreads + tid;
  if (tid < kCh) {
    const int e = min(d0 + tid, p.dim - 1);
    sm.sbias[tid] = p.bias ? p.bias[e] : 0.f;
    sm.sD[tid] = p.D ? p.D[e] : 0.f;
  }

  // Starts copying the stage from step s0 into buffer k: u, delta and B, and with `all` z, dout and C.
  auto fill = [&](int k, int s0, bool all) {
    lanes_stage_copy<TPC>(sm.own[k], sm.bc[k], rows, all ? 4 : 2, all ? 2 : 1, Bp, Cp, p, s0, c, r);
  };
  // 1.: past the sequence's end dt = 0 (a = 1, x = 0) and dy = 0; a channel past the last one gets dt u = 0
  // and dy = 0, so that its state and gradient stay 0
  auto prep = [&](int k, int s0, bool all) {
    const int steps = min(kS, p.len - s0);
    for (int i = tid; i < kCh * kS; i += kThreads) {
      const int cc = i / kS, t = i % kS;
      const bool in = t < steps && d0 + cc < p.dim;
      const float raw = to_f(sm.own[k][1][cc][t]) + sm.sbias[cc];
      const float dt = t >= steps ? 0.f : p.softplus ? softplus(raw) : raw;
      sm.sdt[cc][t] = dt;
      sm.sdtu[cc][t] = in ? dt * to_f(sm.own[k][0][cc][t]) : 0.f;
      if (all) {
        float dy = in && rows[3] ? to_f(sm.own[k][3][cc][t]) : 0.f;
        if (rows[2]) {
          const float zv = to_f(sm.own[k][2][cc][t]);
          dy *= zv * sigmoid(zv);
        }
        sm.sdy[cc][t] = dy;
      }
    }
    lanes_bc_floats<NT, kS, kThreads>(sm.bc[k], sm.sB, sm.sC, all);
  };

  float A2[NS], h[NS];
  const float *start = kPieces && piece ? p.states + (bd * p.n_states + piece - 1) * N  // the state before the piece
                                        : p.h0 ? p.h0 + bd * N : nullptr;
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    const int n = r * NS + j;
    A2[j] = n < N ? p.A[dd * N + n] * kLog2e : 0.f;
    h[j] = live && n < N && start ? start[n] : 0.f;
  }

  // The forward walk, keeping the state before every kH steps.
  fill(0, s_begin * kS, false);
  for (int s = s_begin, k = 0; s < s_end; ++s, k ^= 1) {
    __pipeline_wait_prior(0);
    __syncthreads();
    if (s + 1 < s_end) fill(k ^ 1, (s + 1) * kS, false);
    prep(k, s * kS, false);
    __syncthreads();
#pragma unroll
    for (int t0 = 0; t0 < kS; t0 += kG) {
      if (t0 % kH == 0) {
#pragma unroll
        for (int j = 0; j < NS; ++j) ck[((s * kHalves + t0 / kH) * NS + j) * kThreads] = h[j];
      }
      float a[kG][NS], x[kG][NS];
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        const float dt = sm.sdt[c][t0 + g], dtu = sm.sdtu[c][t0 + g];
        float Bv[NS];
        load_states<NS>(&sm.sB[t0 + g][r * NS], Bv);
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          a[g][j] = exp2f(dt * A2[j]);
          x[g][j] = dtu * Bv[j];
        }
      }
#pragma unroll
      for (int g = 0; g < kG; ++g)
#pragma unroll
        for (int j = 0; j < NS; ++j) h[j] = fmaf(a[g][j], h[j], x[g][j]);
    }
  }

  // The reverse walk, once the next piece's item has left its carried gradient in dh0.
  const bool last = !kPieces || piece == p.pieces - 1;
  if (!last && tid == 0) {
    const volatile int *flag = p.sync + sm.item + 1;  // the next piece's
    while (!*flag) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
      __nanosleep(256);
#endif
    }
    __threadfence();
  }
  __syncthreads();  // every thread is done with the forward walk's buffers (and the carry has landed)
  float cr[NS], dA[NS];
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    const int n = r * NS + j;
    cr[j] = !live || n >= N ? 0.f : !last ? __ldcg(p.dh0 + bd * N + n) : p.dlast ? p.dlast[bd * N + n] : 0.f;
    dA[j] = 0.f;
  }
  float dD_sum = 0.f, dbias_sum = 0.f;
  const bool vec4 = p.len % 4 == 0;
  float *dB = p.dB + int64_t(b) * N * p.len, *dC = p.dC + int64_t(b) * N * p.len;
  fill(0, (s_end - 1) * kS, true);
  for (int s = s_end - 1, k = 0; s >= (kPieces ? sm.s_begin : 0); --s, k ^= 1) {
    const int s0 = s * kS, steps = min(kS, p.len - s0);
    float hk[NS];  // the last half's kept state, loaded before the barrier so that its latency is hidden
#pragma unroll
    for (int j = 0; j < NS; ++j) hk[j] = ck[((s * kHalves + kHalves - 1) * NS + j) * kThreads];
    __pipeline_wait_prior(0);
    __syncthreads();
    if (s > (kPieces ? sm.s_begin : 0)) fill(k ^ 1, s0 - kS, true);
    prep(k, s0, true);
    __syncthreads();
    // 2., one half-stage at a time: rolled, the stage's loop fits the instruction cache better (unrolled, at 24
    // state slots, warps waited 0.77 cycles an issued instruction on fetches; rolled, the backward took 5-7% less
    // time, bench/results/issue13/s10)
#pragma unroll 1
    for (int hf = kHalves - 1; hf >= 0; --hf) {
      float hn[NS];  // the next half's kept state, in flight during this one
      if (hf > 0) {
#pragma unroll
        for (int j = 0; j < NS; ++j) hn[j] = ck[((s * kHalves + hf - 1) * NS + j) * kThreads];
      }
      float hs[kH][NS];  // the state after each of the half's steps
#pragma unroll
      for (int t = 0; t < kH; ++t) {
        const int tt = hf * kH + t;
        const float dt = sm.sdt[c][tt], dtu = sm.sdtu[c][tt];
        float Bv[NS];
        load_states<NS>(&sm.sB[tt][r * NS], Bv);
#pragma unroll
        for (int j = 0; j < NS; ++j) hs[t][j] = fmaf(exp2f(dt * A2[j]), t ? hs[t - 1][j] : hk[j], dtu * Bv[j]);
      }
#pragma unroll
      for (int t0 = kH - kG; t0 >= 0; t0 -= kG) {
        const int tg = hf * kH + t0;  // the group's first step in the stage
        float s1[kG], s2[kG], s3[kG];
#pragma unroll
        for (int g = kG - 1; g >= 0; --g) {
          const int t = t0 + g, tt = tg + g;
          const float dt = sm.sdt[c][tt], dtu = sm.sdtu[c][tt], dy = sm.sdy[c][tt];
          float Bv[NS], Cv[NS];
          load_states<NS>(&sm.sB[tt][r * NS], Bv);
          load_states<NS>(&sm.sC[tt][r * NS], Cv);
          float a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
          for (int j = 0; j < NS; ++j) {
            const float a = exp2f(dt * A2[j]), prev = t ? hs[t - 1][j] : hk[j];
            const float dh = fmaf(Cv[j], dy, cr[j]);
            const float q = dh * (a * prev);  // dh a_t h_{t-1}
            a1 = fmaf(q, A2[j], a1);
            a2 = fmaf(dh, Bv[j], a2);
            a3 = fmaf(Cv[j], hs[t][j], a3);
            dA[j] = fmaf(q, dt, dA[j]);
            cr[j] = a * dh;
            sm.red[warp][g][0][r * NS + j][cl] = dh * dtu;
            sm.red[warp][g][1][r * NS + j][cl] = hs[t][j] * dy;
          }
          s1[g] = a1 * kLn2;  // A2 is A log2(e)
          s2[g] = a2;
          s3[g] = a3;
        }
#pragma unroll
        for (int o = 1; o < TPC; o *= 2)
#pragma unroll
          for (int g = 0; g < kG; ++g) {
            s1[g] += __shfl_xor_sync(0xffffffffu, s1[g], o);
            s2[g] += __shfl_xor_sync(0xffffffffu, s2[g], o);
            s3[g] += __shfl_xor_sync(0xffffffffu, s3[g], o);
          }
        if (r == 0) {
          *reinterpret_cast<float4 *>(&sm.s1[c][tg]) = make_float4(s1[0], s1[1], s1[2], s1[3]);
          *reinterpret_cast<float4 *>(&sm.s2[c][tg]) = make_float4(s2[0], s2[1], s2[2], s2[3]);
          *reinterpret_cast<float4 *>(&sm.s3[c][tg]) = make_float4(s3[0], s3[1], s3[2], s3[3]);
        }
        __syncwarp();
        // item i: dB (i < NT) or dC (NT <= i < 2 NT) of state i % NT, summed over the warp's channels; its K
        // steps from g0 go to the block's slots (kBlockSums) or straight to the atomics
        const int buf = t0 / kG % 2;
        auto emit = [&](int i, int g0, const auto &v) {
          if constexpr (!kBlockSums)
            add_steps((i / NT ? dC : dB) + int64_t(i % NT) * p.len + s0 + tg + g0, steps - tg - g0, vec4, v);
          else if constexpr (sizeof(v) == kG * sizeof(float))
            *sum_slot(warp, buf, i) = make_float4(v[0], v[1], v[2], v[3]);
          else
            reinterpret_cast<float2 *>(sum_slot(warp, buf, i))[g0 / 2] = make_float2(v[0], v[1]);
        };
#pragma unroll
        for (int i = lane; i < kWhole; i += 32) {
          float v[kG];
          channel_sums<S>(sm.red[warp], i, 0, v);
          if (kBlockSums || i % NT < N) emit(i, 0, v);   // (the block's sums skip padded states when summing)
        }
        if constexpr (kTail > 0) {
          const int i = kWhole + lane % kTail, g0 = lane / kTail * 2;
          if (lane < 2 * kTail && (kBlockSums || i % NT < N)) {
            float v[2];
            channel_sums<S>(sm.red[warp], i, g0, v);
            emit(i, g0, v);
          }
        }
        if constexpr (kBlockSums) {
          __syncthreads();
          if (const int i = lane * S::kWarps + warp; i < 2 * NT && i % NT < N) {
            float4 acc = *sum_slot(0, buf, i);
#pragma unroll
            for (int w = 1; w < S::kWarps; ++w) {
              const float4 x = *sum_slot(w, buf, i);
              acc.x += x.x, acc.y += x.y, acc.z += x.z, acc.w += x.w;
            }
            const float v[kG] = {acc.x, acc.y, acc.z, acc.w};
            add_steps((i / NT ? dC : dB) + int64_t(i % NT) * p.len + s0 + tg, steps - tg, vec4, v);
          }
        } else {
          __syncwarp();
        }
      }
      if (hf > 0) {
#pragma unroll
        for (int j = 0; j < NS; ++j) hk[j] = hn[j];
      }
    }
    __syncthreads();
    {  // 3., a thread's kItems consecutive steps of one channel
      const int cc = tid * kItems / kS, t0 = tid * kItems % kS, e = d0 + cc, n = min(kItems, steps - t0);
      if (n > 0 && e < p.dim) {
        float s1v[kItems], s2v[kItems], s3v[kItems], dtv[kItems], dyv[kItems];
        load_states<kItems>(&sm.s1[cc][t0], s1v);
        load_states<kItems>(&sm.s2[cc][t0], s2v);
        load_states<kItems>(&sm.s3[cc][t0], s3v);
        load_states<kItems>(&sm.sdt[cc][t0], dtv);
        load_states<kItems>(&sm.sdy[cc][t0], dyv);
        float uv[kItems], raw[kItems], zv[kItems], dout[kItems];
        load_steps<T>(&sm.own[k][0][cc][t0], uv);
        load_steps<T>(&sm.own[k][1][cc][t0], raw);
        if (rows[2]) load_steps<T>(&sm.own[k][2][cc][t0], zv);
        if (rows[3]) load_steps<T>(&sm.own[k][3][cc][t0], dout);
        float du[kItems], ddt[kItems], dz[kItems], oz[kItems];
#pragma unroll
        for (int m = 0; m < kItems; ++m) {
          ddt[m] = fmaf(uv[m], s2v[m], s1v[m]);
          if (p.softplus) ddt[m] *= sigmoid(raw[m] + sm.sbias[cc]);
          du[m] = fmaf(dtv[m], s2v[m], sm.sD[cc] * dyv[m]);
          const float y = fmaf(sm.sD[cc], uv[m], s3v[m]);
          if (m < n) {
            dD_sum = fmaf(dyv[m], uv[m], dD_sum);
            dbias_sum += ddt[m];
          }
          oz[m] = y;
          if (rows[2]) {
            const float sz = sigmoid(zv[m]), gz = rows[3] ? dout[m] : 0.f;
            dz[m] = gz * y * sz * (1.f + zv[m] * (1.f - sz));
            oz[m] = y * zv[m] * sz;
          }
        }
        const int64_t at = s0 + t0;
        store_steps<T>(static_cast<T *>(p.du) + b * p.du_b + e * p.du_d + at, du, n);
        store_steps<T>(static_cast<T *>(p.ddelta) + b * p.ddt_b + e * p.ddt_d + at, ddt, n);
        if (rows[2] && p.dz) store_steps<T>(static_cast<T *>(p.dz) + b * p.dz_b + e * p.dz_d + at, dz, n);
        if (p.out_z) store_steps<T>(static_cast<T *>(p.out_z) + b * p.oz_b + e * p.oz_d + at, oz, n);
      }
    }
  }

  if (live) {
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      const int n = r * NS + j;
      if (n >= N) continue;
      p.dh0[bd * N + n] = cr[j];  // the first piece's: the initial state's gradient; a later one's: the carry
      atomicAdd(p.dA + dd * N + n, dA[j]);
    }
  }
  if (kPieces && piece > 0) {  // the carry is in place: the previous piece's item may start its reverse walk
    __threadfence();
    __syncthreads();
    if (tid == 0) atomicExch(p.sync + sm.item, 1);
  }
  // a channel's kS steps of pass 3 are kS / kItems consecutive threads
#pragma unroll
  for (int o = 1; o < kS / kItems; o *= 2) {
    dD_sum += __shfl_xor_sync(0xffffffffu, dD_sum, o);
    dbias_sum += __shfl_xor_sync(0xffffffffu, dbias_sum, o);
  }
  const int e = d0 + tid * kItems / kS;
  if (tid % (kS / kItems) == 0 && e < p.dim) {
    if (p.dD) atomicAdd(p.dD + e, dD_sum);
    if (p.dbias) atomicAdd(p.dbias + e, dbias_sum);
  }
}

}  // namespace mambapeft_scan
