// wavefront2d's CUDA forward and backward under cuda_emu, against the CPU implementation on the
// same random inputs (channels-last operands, as the layers pass them).
//
//   wavefront2d [--seed S] [--cases K] [--only b,e,n,g,h,w] [--bwd] [--dtype f32|bf16|f16] [--verbose]
//
// Each case: random sizes (or --only), flipped rows / columns (negative strides), origin_top, D on
// or off; the forward into a float32 accumulator and (lane kernels) in the inputs' dtype, and with
// --bwd the backward (atomic and deterministic dBT/dBL/dC). The kernels' blocks hand rows and strips
// to each other: run with CUDA_EMU_BLOCKS at least the grid's block count (emu.py sets 4096 unless
// told otherwise; at most CUDA_EMU_MAX_THREADS threads at once). Prints one line per case and exits 1
// if any mismatched.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "ssm2d/wavefront2d.h"

using namespace ssm2d;
using namespace emu_driver;

namespace {


struct Case {
  int64_t b, e, n, g, h, w;
  bool D, origin_top;
  int flip;  // bit 0: rows, bit 1: columns
  DType dt;
};

// Channels-last (b, H, W, c[, n]) storage viewed as (b, c, n, i, j), rows / columns flipped by `flip`.
Grid frame(Buf& buf, int64_t H, int64_t W, int64_t C, int64_t N, const Case& c) {
  Grid g;
  g.sb = H * W * C * N;
  g.sc = N;
  g.sn = 1;
  g.si = W * C * N;
  g.sj = C * N;
  int64_t off = 0;
  if (c.flip & 1) { off += (H - 1) * g.si; g.si = -g.si; }
  if (c.flip & 2) { off += (W - 1) * g.sj; g.sj = -g.sj; }
  g.data = static_cast<unsigned char*>(buf.data()) + off * dtype_size(buf.dt);
  return g;
}

int states_per_block(const Case& c) {  // as ssm2d_kernels.wavefront2d.states_per_block
  int cap = cuda::wavefront2d_max_states(c.w);
  int p2 = 1;
  while (p2 * 2 <= cap) p2 *= 2;
  int need = 1;
  while (need < c.n) need *= 2;
  int nw = std::min(p2, need);
  const int sms = std::getenv("CUDA_EMU_SMS") ? std::atoi(std::getenv("CUDA_EMU_SMS")) : 132;
  while (nw > 4 && c.b * c.e * ((c.n + nw - 1) / nw) < sms) nw /= 2;
  return nw;
}

bool run_case(const Case& c, std::mt19937& rng, bool bwd, bool verbose) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  const int64_t cells = c.b * c.h * c.w * c.e, bc = c.b * c.h * c.w * c.g * c.n;
  Buf u(c.dt, cells), dT(c.dt, cells), dL(c.dt, cells), BT(c.dt, bc), BL(c.dt, bc), C(c.dt, bc);
  for (int64_t i = 0; i < cells; ++i) {
    u.set(i, nd(rng));
    dT.set(i, 0.02f + 0.3f * ud(rng));
    dL.set(i, 0.02f + 0.3f * ud(rng));
  }
  for (int64_t i = 0; i < bc; ++i) {
    BT.set(i, nd(rng));
    BL.set(i, nd(rng));
    C.set(i, nd(rng));
  }
  std::vector<float> AT, AL, Dv;
  for (int64_t i = 0; i < c.e * c.n; ++i) {
    AT.push_back(-std::exp(0.5f * nd(rng)));
    AL.push_back(-std::exp(0.5f * nd(rng)));
  }
  for (int64_t i = 0; i < c.e; ++i) Dv.push_back(nd(rng));
  auto problem = [&](int device) {
    Wave2dProblem p;
    p.batch = c.b; p.dim = c.e; p.dstate = c.n; p.groups = c.g; p.height = c.h; p.width = c.w;
    p.dtype = c.dt;
    p.u = frame(u, c.h, c.w, c.e, 1, c);
    p.dT = frame(dT, c.h, c.w, c.e, 1, c);
    p.dL = frame(dL, c.h, c.w, c.e, 1, c);
    p.BT = frame(BT, c.h, c.w, c.g, c.n, c);
    p.BL = frame(BL, c.h, c.w, c.g, c.n, c);
    p.C = frame(C, c.h, c.w, c.g, c.n, c);
    p.AT = AT.data(); p.AL = AL.data();
    p.A_sd = c.n; p.A_sn = 1; p.AL_sd = c.n; p.AL_sn = 1;
    p.D = c.D ? Dv.data() : nullptr;
    p.origin_top = c.origin_top;
    p.device.index = device;
    return p;
  };
  const double tol = tol_of(c.dt);
  bool ok = true;
  Buf ref(DType::kFloat32, cells), got(DType::kFloat32, cells);
  ref.zero();
  got.zero();
  Wave2dProblem pr = problem(-1);
  cpu::wavefront2d_forward(pr, frame(ref, c.h, c.w, c.e, 1, c));
  Wave2dProblem pc = problem(0);
  pc.states_per_block = states_per_block(c);
  std::vector<float> wsf(static_cast<size_t>(cuda::wavefront2d_forward_workspace_floats(pc) + 1), NAN);
  pc.workspace = wsf.data();
  cuda::wavefront2d_forward(pc, frame(got, c.h, c.w, c.e, 1, c));
  ok &= close("fwd", got, ref, tol_of(DType::kFloat32), verbose);
  try {
    Buf got_dt(c.dt, cells);
    got_dt.fill_nan();
    cuda::wavefront2d_forward_dtype(pc, frame(got_dt, c.h, c.w, c.e, 1, c));
    ok &= close("fwd-dtype", got_dt, ref, tol, verbose);
  } catch (const ArgumentError&) {
    if (verbose) std::printf("    (fwd-dtype: not this shape's kernel)\n");
  }
  if (!bwd || !ok) return ok;

  Buf dout(c.dt, cells);  // in the inputs' dtype (the per-cell results are float32 accumulators)
  for (int64_t i = 0; i < cells; ++i) dout.set(i, nd(rng));
  struct Grads {
    Buf du, ddT, ddL, dBT, dBL, dC;
    std::vector<float> dAT, dAL, dD;
  };
  auto grads = [&](int64_t bn_c) {
    Grads g{Buf(DType::kFloat32, cells), Buf(DType::kFloat32, cells), Buf(DType::kFloat32, cells),
            Buf(DType::kFloat32, c.b * c.h * c.w * bn_c * c.n), Buf(DType::kFloat32, c.b * c.h * c.w * bn_c * c.n),
            Buf(DType::kFloat32, c.b * c.h * c.w * bn_c * c.n), std::vector<float>(c.b * c.e * c.n, NAN),
            std::vector<float>(c.b * c.e * c.n, NAN), std::vector<float>(c.b * c.e, NAN)};
    for (Buf* x : {&g.du, &g.ddT, &g.ddL, &g.dBT, &g.dBL, &g.dC}) x->zero();
    return g;
  };
  auto args_of = [&](Grads& g, int64_t bn_c) {
    Wave2dBackwardArgs a;
    a.dout = frame(dout, c.h, c.w, c.e, 1, c);
    a.du = frame(g.du, c.h, c.w, c.e, 1, c);
    a.ddT = frame(g.ddT, c.h, c.w, c.e, 1, c);
    a.ddL = frame(g.ddL, c.h, c.w, c.e, 1, c);
    a.dBT = frame(g.dBT, c.h, c.w, bn_c, c.n, c);
    a.dBL = frame(g.dBL, c.h, c.w, bn_c, c.n, c);
    a.dC = frame(g.dC, c.h, c.w, bn_c, c.n, c);
    a.dAT_part = g.dAT.data();
    a.dAL_part = g.dAL.data();
    a.dD_part = c.D ? g.dD.data() : nullptr;
    return a;
  };
  Grads r = grads(c.g);
  {
    Wave2dBackwardArgs a = args_of(r, c.g);
    cpu::wavefront2d_backward(pr, a);
  }
  for (int det = 0; det < 2 && ok; ++det) {
    const int64_t bn_c = det ? c.e : c.g;
    Grads g = grads(bn_c);
    Wave2dBackwardArgs a = args_of(g, bn_c);
    a.deterministic = det;
    a.e_begin = 0;
    a.e_end = c.e;
    std::vector<float> wsb(static_cast<size_t>(cuda::wavefront2d_backward_workspace_floats(pc) + 1), NAN);
    a.workspace = wsb.data();
    cuda::wavefront2d_backward(pc, a);
    Buf sBT(DType::kFloat32, bc), sBL(DType::kFloat32, bc), sC(DType::kFloat32, bc);
    if (det) {  // per-channel partials (b, H, W, e, n) summed over each group's channels in order
      sBT.zero(); sBL.zero(); sC.zero();
      const int64_t per = c.e / c.g;
      for (int64_t cell = 0; cell < c.b * c.h * c.w; ++cell)
        for (int64_t e = 0; e < c.e; ++e)
          for (int64_t k = 0; k < c.n; ++k) {
            const int64_t dst = (cell * c.g + e / per) * c.n + k, src = (cell * c.e + e) * c.n + k;
            static_cast<float*>(sBT.data())[dst] += g.dBT.get(src);
            static_cast<float*>(sBL.data())[dst] += g.dBL.get(src);
            static_cast<float*>(sC.data())[dst] += g.dC.get(src);
          }
    }
    const double t = 4 * tol_of(DType::kFloat32) + (c.dt == DType::kFloat32 ? 0 : tol);
    if (verbose) std::printf("   %s\n", det ? "[det]" : "[atomic]");
    ok &= close("du", g.du, r.du, t, verbose);
    ok &= close("ddT", g.ddT, r.ddT, t, verbose);
    ok &= close("ddL", g.ddL, r.ddL, t, verbose);
    ok &= close("dBT", det ? sBT : g.dBT, r.dBT, t, verbose);
    ok &= close("dBL", det ? sBL : g.dBL, r.dBL, t, verbose);
    ok &= close("dC", det ? sC : g.dC, r.dC, t, verbose);
    ok &= close("dAT", floats(g.dAT), floats(r.dAT), 1e-3 + t, verbose);
    ok &= close("dAL", floats(g.dAL), floats(r.dAL), 1e-3 + t, verbose);
    if (c.D) ok &= close("dD", floats(g.dD), floats(r.dD), 1e-3 + t, verbose);
    if (!ok) std::printf("   (mismatch in the %s backward)\n", det ? "deterministic" : "atomic");
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, o, "b,e,n,g,h,w")) return 2;
  auto make = [&](std::mt19937& rng) {
    Case c;
    if (!o.only.empty()) {
      c.b = o.only[0]; c.e = o.only[1]; c.n = o.only[2]; c.g = o.only[3]; c.h = o.only[4]; c.w = o.only[5];
    } else {
      c.n = pick(rng, {2, 4, 16, 20});
      c.g = pick(rng, {1, 1, 2});
      c.e = c.g * pick(rng, {8, 16});
      c.b = pick(rng, {1, 2});
      // The general kernel (N > 16) runs a block of N warps per (batch, channel), all at once here.
      if (c.n > 16) c.e = c.g * 4, c.b = 1;
      c.h = pick(rng, {1, 5, 17});
      c.w = pick(rng, {1, 7, 33, 70});
    }
    c.D = rng() % 2; c.origin_top = rng() % 2; c.flip = static_cast<int>(rng() % 4); c.dt = o.dt;
    return c;
  };
  auto describe = [](const Case& c) {
    char line[256];
    std::snprintf(line, sizeof line, "b=%lld e=%lld n=%lld g=%lld %lldx%lld flip=%d origin_top=%d D=%d", (long long)c.b,
                  (long long)c.e, (long long)c.n, (long long)c.g, (long long)c.h, (long long)c.w, c.flip, c.origin_top, c.D);
    return std::string(line);
  };
  return run_cases<Case>(o, make, describe, [&](const Case& c, std::mt19937& rng) { return run_case(c, rng, o.bwd, o.verbose); });
}
