// The Python binding of our selective scan kernels: checks, pointers and strides. ops/scan_cuda_ext.py
// allocates the outputs (so it chooses their layout) and documents the shapes.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "scan.h"

using mambapeft_scan::Params;
using Opt = c10::optional<at::Tensor>;

namespace {

bool aligned(const at::Tensor &t) {
  const int64_t per = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % per == 0 && t.stride(1) % per == 0;
}

// A (b, rows, L) tensor in u's dtype with time contiguous: its pointer and batch / row strides into the
// Params fields; rows that are not 16-byte aligned turn the vector loads off. Absent: a null pointer.
template <typename Ptr>
void rows(Params &p, const Opt &t, const char *name, const at::Tensor &u, Ptr &data, int64_t &s_b, int64_t &s_r) {
  data = nullptr;
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 3 && t->size(0) == u.size(0) && t->size(2) == u.size(2), name, ": expected (b, *, L) like u");
  TORCH_CHECK(t->stride(2) == 1 || t->size(2) == 1, name, ": time must be contiguous");
  TORCH_CHECK(t->scalar_type() == u.scalar_type() && t->is_cuda(), name, ": expected u's dtype, on CUDA");
  data = t->data_ptr();
  s_b = t->stride(0);
  s_r = t->stride(1);
  p.vec = p.vec && aligned(*t);
}

// A contiguous fp32 tensor of `numel` values (absent: null).
float *f32(const Opt &t, const char *name, int64_t numel) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel && t->is_cuda(), name,
              ": expected ", numel, " contiguous fp32 values on CUDA");
  return t->data_ptr<float>();
}

// The forward's kept states (b, E, n, N): after each of the block scan's chunks, or where the lanes backward runs
// in pieces of time (scan.h: lanes_pieces, n_states below) after each piece.
void kept_states(Params &p, const at::Tensor &states, int64_t b) {
  TORCH_CHECK(states.dim() == 4 && states.size(0) == b && states.size(1) == p.dim && states.size(3) == p.dstate,
              "states: expected (b, E, chunks, N)");
  p.n_states = static_cast<int>(states.size(2));
  p.pieces = 1;
  p.state_chunk = mambapeft_scan::chunk_size(p.len);
  if (p.n_states != p.n_chunks) {
    TORCH_CHECK(p.len <= 2048 && p.n_states > 1 && mambapeft_scan::pieces_of(p.len, p.n_states) == p.n_states,
                "states: expected ", p.n_chunks, " a channel, or as many as n_states() gives");
    p.pieces = p.n_states;
    p.state_chunk = mambapeft_scan::piece_len(p.len, p.pieces);
  }
  p.states = f32(states, "states (b, E, chunks, N)", b * p.dim * p.n_states * p.dstate);
}

Params common(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A, const at::Tensor &B,
              const at::Tensor &C, const Opt &D, const Opt &z, const Opt &bias, const Opt &h0, const at::Tensor &states,
              bool softplus) {
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "A: expected (E, N)");
  TORCH_CHECK(u.size(1) <= 65535, "u: at most 65535 channels (the grid's y dimension)");
  Params p{};
  const int64_t b = u.size(0);
  p.dim = u.size(1);
  p.len = u.size(2);
  p.dstate = A.size(1);
  p.n_chunks = mambapeft_scan::chunks_of(p.len);
  p.softplus = softplus;
  p.vec = true;
  rows(p, u, "u", u, p.u, p.u_b, p.u_d);
  rows(p, delta, "delta", u, p.delta, p.dt_b, p.dt_d);
  rows(p, z, "z", u, p.z, p.z_b, p.z_d);
  rows(p, B, "B", u, p.B, p.B_b, p.B_n);
  rows(p, C, "C", u, p.C, p.C_b, p.C_n);
  p.A = f32(A, "A", p.dim * p.dstate);
  p.D = f32(D, "D", p.dim);
  p.bias = f32(bias, "delta_bias", p.dim);
  p.h0 = f32(h0, "initial_state", b * p.dim * p.dstate);
  kept_states(p, states, b);
  return p;
}

void dispatch(const Params &p, const at::Tensor &u, bool forward) {
  const c10::cuda::CUDAGuard guard(u.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int batch = u.size(0);
  cudaError_t err;
  switch (u.scalar_type()) {
    case at::kFloat: err = mambapeft_scan::launch_f32(p, forward, batch, stream); break;
    case at::kBFloat16: err = mambapeft_scan::launch_bf16(p, forward, batch, stream); break;
    case at::kHalf: err = mambapeft_scan::launch_f16(p, forward, batch, stream); break;
    default: TORCH_CHECK(false, "u: expected float32, bfloat16 or float16");
  }
  TORCH_CHECK(err == cudaSuccess, "selective scan kernel launch: ", cudaGetErrorString(err));
}

// y absent: only the states are wanted. kernel: 0 the launcher's choice, 1 the block scan, 2 threads along
// channels and states (scan_kernels.cuh: fwd_lanes_kernel, up to 32 states).
void fwd(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C, Opt D, Opt z, Opt bias, Opt h0,
         bool softplus, Opt y, at::Tensor states, int64_t kernel) {
  Params p = common(u, delta, A, B, C, D, z, bias, h0, states, softplus);
  TORCH_CHECK(kernel >= 0 && kernel <= 2, "kernel: expected 0 (auto), 1 (block scan) or 2 (threads along channels)");
  p.forward_kernel = static_cast<int>(kernel);
  TORCH_CHECK(p.pieces == 1 || mambapeft_scan::lanes(p, true, u.size(0)),
              "states: kept for pieces (n_states()), which only the forward along channels writes");
  rows(p, y, "y", u, p.y, p.y_b, p.y_d);
  dispatch(p, u, true);
}

// dA, dB, dC, dD, dbias must be zeros (they are summed into); every other output is overwritten. kernel: as
// fwd's (scan_bwd_lanes.cuh: threads along channels and states, up to 32 states).
void bwd(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C, Opt D, Opt z, Opt bias, Opt h0,
         bool softplus, at::Tensor states, Opt dout, Opt dlast, at::Tensor du, at::Tensor ddelta, at::Tensor dA,
         at::Tensor dB, at::Tensor dC, Opt dD, Opt dbias, Opt dz, Opt out_z, at::Tensor dh0, int64_t kernel) {
  Params p = common(u, delta, A, B, C, D, z, bias, h0, states, softplus);
  TORCH_CHECK(kernel >= 0 && kernel <= 2, "kernel: expected 0 (auto), 1 (block scan) or 2 (threads along channels)");
  p.backward_kernel = static_cast<int>(kernel);
  TORCH_CHECK(z.has_value() == dz.has_value(), "dz: given exactly when z is");
  TORCH_CHECK(D.has_value() == dD.has_value() && bias.has_value() == dbias.has_value(),
              "dD, ddelta_bias: given exactly when D, delta_bias are");
  rows(p, dout, "dout", u, p.dout, p.do_b, p.do_d);
  rows(p, du, "du", u, p.du, p.du_b, p.du_d);
  rows(p, ddelta, "ddelta", u, p.ddelta, p.ddt_b, p.ddt_d);
  rows(p, dz, "dz", u, p.dz, p.dz_b, p.dz_d);
  rows(p, out_z, "out_z", u, p.out_z, p.oz_b, p.oz_d);
  const int64_t b = u.size(0), bEN = b * p.dim * p.dstate;
  p.dlast = f32(dlast, "dlast", bEN);
  p.dA = f32(dA, "dA", p.dim * p.dstate);
  p.dB = f32(dB, "dB (b, N, L)", b * p.dstate * p.len);
  p.dC = f32(dC, "dC (b, N, L)", b * p.dstate * p.len);
  p.dD = f32(dD, "dD", p.dim);
  p.dbias = f32(dbias, "ddelta_bias", p.dim);
  p.dh0 = f32(dh0, "dinitial_state", bEN);
  // the block scan reads no kept state in one chunk; the lanes kernels for 1 or 2 threads a channel walk it whole
  if (!mambapeft_scan::lanes_pieces_ok(p, b)) p.pieces = 1;
  const int64_t kept = mambapeft_scan::lanes_backward_scratch(p, b), n_sync = mambapeft_scan::lanes_backward_sync(p, b);
  at::Tensor scratch, sync;  // from torch's caching allocator (and a CUDA graph's pool while one is captured)
  if (kept) {
    scratch = at::empty({kept}, u.options().dtype(at::kFloat));
    p.scratch = scratch.data_ptr<float>();
  }
  if (n_sync) {
    sync = at::zeros({n_sync}, u.options().dtype(at::kInt));
    p.sync = sync.data_ptr<int>();
  }
  dispatch(p, u, false);
}

// Whether "auto" runs the kernels along channels and states both ways at this shape.
bool lanes(int64_t batch, int64_t dim, int64_t dstate) {
  Params p{};
  p.dim = static_cast<int>(dim);
  p.dstate = static_cast<int>(dstate);
  return mambapeft_scan::lanes(p, true, static_cast<int>(batch)) && mambapeft_scan::lanes(p, false, static_cast<int>(batch));
}

// How many states a channel the forward keeps (the states tensor's third size) for this shape and these kernels:
// one a piece where the lanes backward runs in pieces of time (pieces: 0 the launcher's choice, 1 none, else
// that many), else one a chunk of the block scan.
int64_t n_states(int64_t batch, int64_t dim, int64_t dstate, int64_t len, int64_t forward_kernel,
                 int64_t backward_kernel, int64_t pieces) {
  Params p{};
  p.dim = static_cast<int>(dim);
  p.dstate = static_cast<int>(dstate);
  p.len = static_cast<int>(len);
  p.forward_kernel = static_cast<int>(forward_kernel);
  p.backward_kernel = static_cast<int>(backward_kernel);
  const int k = mambapeft_scan::lanes_pieces(p, static_cast<int>(batch), static_cast<int>(pieces));
  return k > 1 ? k : mambapeft_scan::chunks_of(p.len);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "selective scan forward from an initial state");
  m.def("bwd", &bwd, "selective scan backward, with the initial state's gradient");
  m.def("lanes", &lanes, "whether auto runs the kernels along channels and states, forward and backward");
  m.def("chunk_size", &mambapeft_scan::chunk_size, "steps per chunk for a length");
  m.def("n_states", &n_states, "states a channel the forward keeps (batch, dim, dstate, len, kernels, pieces)");
}
