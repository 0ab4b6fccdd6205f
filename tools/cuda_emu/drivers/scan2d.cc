// scan2d's CUDA forward and backward (every kernel family the dispatch picks) under cuda_emu, against
// the CPU implementation on the same random inputs.
//
//   scan2d [--seed S] [--cases K] [--only b,d,n,g,h,w] [--bwd] [--dtype f32|bf16|f16] [--verbose] [--masked] [--hv]
//
// --masked: every case with softplus has delta = -inf at about a third of its cells (how the MIL
// layer marks empty cells: softplus(-inf + bias) = 0, a transparent cell) and each kernel must agree
// with the CPU kernel there, finite.
//
// Each case: random sizes (or --only), origin (negative strides), order (transposed strides), z,
// D, delta_bias, softplus on or off; the no-grad forward, the training forward (carries saved) and,
// with --bwd, the backward (atomic and deterministic dB/dC). Prints one line per case and exits 1 on
// the first mismatch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "ssm2d/scan2d.h"

using namespace ssm2d;
using namespace emu_driver;

namespace {


struct Case {
  int64_t b, d, n, g, h, w;  // physical H x W
  bool z, D, bias, softplus, transpose, masked = false;
  int origin;  // bit 0: flip rows, bit 1: flip columns (of the logical frame)
  DType dt;
};

// The logical frame of a (b, c[, n], H, W) contiguous array: transposed for order "vh", then flipped.
Grid frame(Buf& buf, int64_t sb, int64_t sc, int64_t sn, int64_t H, int64_t W, const Case& c) {
  Grid g;
  int64_t si = W, sj = 1, lh = H, lw = W;
  if (c.transpose) { std::swap(si, sj); std::swap(lh, lw); }
  int64_t off = 0;
  if (c.origin & 1) { off += (lh - 1) * si; si = -si; }
  if (c.origin & 2) { off += (lw - 1) * sj; sj = -sj; }
  g.data = static_cast<unsigned char*>(buf.data()) + off * dtype_size(buf.dt);
  g.sb = sb; g.sc = sc; g.sn = sn; g.si = si; g.sj = sj;
  return g;
}

struct Inputs {
  Buf u, delta, z, B, C;
  std::vector<float> A, D, bias;
};

Inputs make_inputs(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  const int64_t cells = c.b * c.d * c.h * c.w, bc = c.b * c.g * c.n * c.h * c.w;
  Inputs in{Buf(c.dt, cells), Buf(c.dt, cells), Buf(c.dt, c.z ? cells : 0), Buf(c.dt, bc), Buf(c.dt, bc), {}, {}, {}};
  for (int64_t i = 0; i < cells; ++i) {
    in.u.set(i, nd(rng));
    in.delta.set(i, c.softplus ? (c.masked && ud(rng) < 0.33f ? -INFINITY : nd(rng) - 1.f) : 0.05f + 0.3f * ud(rng));
    if (c.z) in.z.set(i, nd(rng));
  }
  for (int64_t i = 0; i < bc; ++i) {
    in.B.set(i, nd(rng));
    in.C.set(i, nd(rng));
  }
  for (int64_t i = 0; i < c.d * c.n; ++i) in.A.push_back(-std::exp(nd(rng) * 0.5f));
  for (int64_t i = 0; i < c.d; ++i) {
    in.D.push_back(nd(rng));
    // Without softplus dt = delta + bias must stay positive (else the decays exceed 1 and long
    // grids overflow in both implementations).
    in.bias.push_back(c.softplus ? 0.5f * nd(rng) : 0.05f * ud(rng));
  }
  return in;
}

Scan2dProblem problem(const Case& c, Inputs& in, int device) {
  Scan2dProblem p;
  const int64_t hw = c.h * c.w;
  p.batch = c.b; p.dim = c.d; p.dstate = c.n; p.groups = c.g;
  p.height = c.transpose ? c.w : c.h;
  p.width = c.transpose ? c.h : c.w;
  p.dtype = c.dt;
  p.softplus = c.softplus;
  p.u = frame(in.u, c.d * hw, hw, 0, c.h, c.w, c);
  p.delta = frame(in.delta, c.d * hw, hw, 0, c.h, c.w, c);
  if (c.z) p.z = frame(in.z, c.d * hw, hw, 0, c.h, c.w, c);
  p.B = frame(in.B, c.g * c.n * hw, c.n * hw, hw, c.h, c.w, c);
  p.C = frame(in.C, c.g * c.n * hw, c.n * hw, hw, c.h, c.w, c);
  p.A = in.A.data(); p.A_sd = c.n; p.A_sn = 1;
  p.D = c.D ? in.D.data() : nullptr;
  p.delta_bias = c.bias ? in.bias.data() : nullptr;
  p.device.index = device;
  return p;
}

bool run_case(const Case& c, std::mt19937& rng, bool bwd, bool verbose) {
  Inputs in = make_inputs(c, rng);
  const int64_t cells = c.b * c.d * c.h * c.w, hw = c.h * c.w, lh = c.transpose ? c.w : c.h, lw = c.transpose ? c.h : c.w;
  const double tol = tol_of(c.dt);
  bool ok = true;

  // Forward: CPU reference, CUDA without and with carries.
  Buf ref(c.dt, cells), got(c.dt, cells), got_train(c.dt, cells), y_train(c.dt, c.z ? cells : 0);
  {
    Scan2dProblem p = problem(c, in, -1);
    Scan2dForwardOutputs o;
    o.out = frame(ref, c.d * hw, hw, 0, c.h, c.w, c);
    cpu::scan2d_forward(p, o);
  }
  Scan2dProblem pc = problem(c, in, 0);
  std::vector<float> ws(static_cast<size_t>(cuda::scan2d_forward_workspace_floats(c.b, c.d, c.n, lh, lw) + 1), NAN);
  {
    got.fill_nan();
    Scan2dForwardOutputs o;
    o.out = frame(got, c.d * hw, hw, 0, c.h, c.w, c);
    o.workspace = ws.data();
    cuda::scan2d_forward(pc, o);
    ok &= close("fwd", got, ref, tol, verbose);
  }
  std::vector<float> carries(static_cast<size_t>(cuda::scan2d_carry_floats(c.b, c.d, c.n, lh, lw) + 1), NAN);
  std::vector<float> ws_t(static_cast<size_t>(cuda::scan2d_forward_workspace_floats(c.b, c.d, c.n, lh, lw, true) + 1), NAN);
  const bool keep_y = c.z && cuda::scan2d_backward_needs_y(c.d, c.g, c.n);
  {
    got_train.fill_nan();
    Scan2dForwardOutputs o;
    o.out = frame(got_train, c.d * hw, hw, 0, c.h, c.w, c);
    if (keep_y) o.y = frame(y_train, c.d * hw, hw, 0, c.h, c.w, c);
    o.carries = carries.data();
    o.workspace = ws_t.data();
    cuda::scan2d_forward(pc, o);
    ok &= close("fwd-train", got_train, ref, tol, verbose);
  }
  if (!bwd || !ok) return ok;

  std::normal_distribution<float> nd(0.f, 1.f);
  Buf dout(c.dt, cells);
  for (int64_t i = 0; i < cells; ++i) dout.set(i, nd(rng));
  const int64_t bc = c.b * c.g * c.n * hw;
  struct Grads {
    Buf du, ddelta, dz;
    std::vector<float> dB, dC, dA, dD, dbias;
  };
  auto grads_of = [&](const Case& cc) {
    return Grads{Buf(cc.dt, cells), Buf(cc.dt, cells), Buf(cc.dt, cc.z ? cells : 0),
                 std::vector<float>(bc, 0.f), std::vector<float>(bc, 0.f), std::vector<float>(cc.b * cc.d * cc.n, NAN),
                 std::vector<float>(cc.b * cc.d, NAN), std::vector<float>(cc.b * cc.d, NAN)};
  };
  auto args_of = [&](Grads& gr, Buf& dB_buf, Buf& dC_buf) {
    Scan2dBackwardArgs a;
    a.dout = frame(dout, c.d * hw, hw, 0, c.h, c.w, c);
    a.du = frame(gr.du, c.d * hw, hw, 0, c.h, c.w, c);
    a.ddelta = frame(gr.ddelta, c.d * hw, hw, 0, c.h, c.w, c);
    if (c.z) a.dz = frame(gr.dz, c.d * hw, hw, 0, c.h, c.w, c);
    a.dB = frame(dB_buf, c.g * c.n * hw, c.n * hw, hw, c.h, c.w, c);
    a.dC = frame(dC_buf, c.g * c.n * hw, c.n * hw, hw, c.h, c.w, c);
    a.dA_part = gr.dA.data();
    a.dD_part = c.D ? gr.dD.data() : nullptr;
    a.ddelta_bias_part = c.bias ? gr.dbias.data() : nullptr;
    return a;
  };
  Grads r = grads_of(c);
  Buf rB(DType::kFloat32, bc), rC(DType::kFloat32, bc);
  std::memset(rB.data(), 0, rB.bytes.size());
  std::memset(rC.data(), 0, rC.bytes.size());
  {
    Scan2dProblem p = problem(c, in, -1);
    Scan2dBackwardArgs a = args_of(r, rB, rC);
    cpu::scan2d_backward(p, a);
  }
  for (int det = 0; det < 2 && ok; ++det) {
    Grads gg = grads_of(c);
    gg.du.fill_nan();
    gg.ddelta.fill_nan();
    gg.dz.fill_nan();
    Buf gB(DType::kFloat32, bc), gC(DType::kFloat32, bc);
    std::memset(gB.data(), 0, gB.bytes.size());
    std::memset(gC.data(), 0, gC.bytes.size());
    std::vector<float> bws(static_cast<size_t>(cuda::scan2d_backward_workspace_floats(c.b, c.d, c.n, lh, lw) + 1), NAN);
    Scan2dBackwardArgs a = args_of(gg, gB, gC);
    a.carries = carries.data();
    a.workspace = bws.data();
    if (keep_y) a.y = frame(y_train, c.d * hw, hw, 0, c.h, c.w, c);
    Buf pB, pC;
    if (det) {
      // Per-channel partials (b, d, n, H, W), summed here over each group's channels in order.
      a.deterministic = true;
      pB = Buf(DType::kFloat32, c.b * c.d * c.n * hw);
      pC = Buf(DType::kFloat32, c.b * c.d * c.n * hw);
      pB.fill_nan();
      pC.fill_nan();
      a.dB = frame(pB, c.d * c.n * hw, c.n * hw, hw, c.h, c.w, c);
      a.dC = frame(pC, c.d * c.n * hw, c.n * hw, hw, c.h, c.w, c);
      a.d_begin = 0;
      a.d_end = c.d;
    }
    cuda::scan2d_backward(pc, a);
    if (det) {
      const int64_t per = c.d / c.g;
      for (int64_t b = 0; b < c.b; ++b)
        for (int64_t d = 0; d < c.d; ++d)
          for (int64_t k = 0; k < c.n * hw; ++k) {
            const int64_t dst = (b * c.g + d / per) * c.n * hw + k, src = (b * c.d + d) * c.n * hw + k;
            static_cast<float*>(gB.data())[dst] += pB.get(src);
            static_cast<float*>(gC.data())[dst] += pC.get(src);
          }
    }
    const char* tag = det ? "[det]" : "[atomic]";
    if (verbose) std::printf("   %s\n", tag);
    ok &= close("du", gg.du, r.du, tol * 4, verbose);
    ok &= close("ddelta", gg.ddelta, r.ddelta, tol * 4, verbose);
    if (c.z) ok &= close("dz", gg.dz, r.dz, tol * 4, verbose);
    ok &= close("dB", gB, rB, 4 * tol_of(DType::kFloat32) + (c.dt == DType::kFloat32 ? 0 : tol), verbose);
    ok &= close("dC", gC, rC, 4 * tol_of(DType::kFloat32) + (c.dt == DType::kFloat32 ? 0 : tol), verbose);
    ok &= close("dA", floats(gg.dA), floats(r.dA), 1e-3 + (c.dt == DType::kFloat32 ? 0 : tol), verbose);
    if (c.D) ok &= close("dD", floats(gg.dD), floats(r.dD), 1e-3 + (c.dt == DType::kFloat32 ? 0 : tol), verbose);
    if (c.bias) ok &= close("dbias", floats(gg.dbias), floats(r.dbias), 1e-3 + (c.dt == DType::kFloat32 ? 0 : tol), verbose);
    if (!ok) std::printf("   (mismatch in the %s backward)\n", tag);
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool masked = false;  // (--masked, --hv: this driver's own options, taken out before the common ones)
  bool hv_only = false;  // --hv: no transposed ("vh") cases, so that --only's H x W is the scanned grid
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::string(argv[i]) == "--masked") masked = true;
    else if (std::string(argv[i]) == "--hv") hv_only = true;
    else args.push_back(argv[i]);
  }
  if (!parse(static_cast<int>(args.size()), args.data(), o, "b,d,n,g,h,w")) return 2;
  auto make = [&](std::mt19937& rng) {
    Case c;
    if (!o.only.empty()) {
      c.b = o.only[0]; c.d = o.only[1]; c.n = o.only[2]; c.g = o.only[3]; c.h = o.only[4]; c.w = o.only[5];
    } else {
      c.n = pick(rng, {1, 2, 4, 8, 12, 16});
      c.g = pick(rng, {1, 1, 2});
      c.d = c.g * pick(rng, {1, 3, 8, 16});
      c.b = pick(rng, {1, 2});
      c.h = pick(rng, {1, 3, 16, 17, 40});
      c.w = pick(rng, {1, 5, 16, 33, 130, 300});
    }
    c.z = rng() % 2; c.D = rng() % 2; c.bias = rng() % 2; c.softplus = masked || rng() % 2;
    c.masked = masked;
    c.transpose = !hv_only && rng() % 2; c.origin = static_cast<int>(rng() % 4); c.dt = o.dt;
    return c;
  };
  auto describe = [](const Case& c) {
    char line[256];
    std::snprintf(line, sizeof line, "b=%lld d=%lld n=%lld g=%lld %lldx%lld%s origin=%d z=%d D=%d bias=%d softplus=%d",
                  (long long)c.b, (long long)c.d, (long long)c.n, (long long)c.g, (long long)c.h, (long long)c.w,
                  c.transpose ? " transposed" : "", c.origin, c.z, c.D, c.bias, c.softplus);
    return std::string(line);
  };
  return run_cases<Case>(o, make, describe, [&](const Case& c, std::mt19937& rng) { return run_case(c, rng, o.bwd, o.verbose); });
}
