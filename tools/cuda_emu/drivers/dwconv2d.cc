// The depthwise convolution's CUDA forward and backward under cuda_emu, against a float64 loop over
// the definition (PyTorch's Conv2d(C, C, k, padding=k//2, groups=C)) on the same random inputs.
//
//   dwconv2d [--seed S] [--cases K] [--only b,c,h,w,k,bias] [--bwd] [--dtype f32|bf16|f16] [--verbose]
//
// Each case: the forward (y) and, with --bwd, the backward (dx, dweight, dbias; then dx alone and
// the sums alone). Prints one line per case and exits 1 on the first mismatch.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "ssm2d/dwconv2d.h"

using namespace ssm2d;
using namespace emu_driver;

namespace {

struct Case {
  int64_t b, c, h, w;
  int k;
  bool bias;
  DType dt;
};

// y = w (*) x + bias in float64 from the rounded inputs; also the backward's three results.
struct Ref {
  std::vector<double> y, dx, dw, db;
};

Ref reference(const Case& cs, const Buf& x, const std::vector<float>& w, const std::vector<float>& bias, const Buf& dy) {
  const int64_t H = cs.h, W = cs.w, P = cs.k / 2, K = cs.k, cells = cs.b * cs.c * H * W;
  Ref r{std::vector<double>(cells, 0.0), std::vector<double>(cells, 0.0), std::vector<double>(cs.c * K * K, 0.0),
        std::vector<double>(cs.c, 0.0)};
  for (int64_t pl = 0; pl < cs.b * cs.c; ++pl) {
    const int64_t ch = pl % cs.c, base = pl * H * W;
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        double acc = cs.bias ? bias[ch] : 0.0;
        const double g = dy.n ? dy.get(base + i * W + j) : 0.0;
        r.db[ch] += g;
        for (int64_t p = 0; p < K; ++p)
          for (int64_t q = 0; q < K; ++q) {
            const int64_t ii = i + p - P, jj = j + q - P;
            if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
            const double xv = x.get(base + ii * W + jj), wv = w[(ch * K + p) * K + q];
            acc += wv * xv;
            r.dx[base + ii * W + jj] += wv * g;  // the adjoint of the line above
            r.dw[(ch * K + p) * K + q] += g * xv;
          }
        r.y[base + i * W + j] = acc;
      }
  }
  return r;
}

Buf as_buf(DType t, const std::vector<double>& v) {
  Buf b(t, static_cast<int64_t>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) b.set(static_cast<int64_t>(i), static_cast<float>(v[i]));
  return b;
}

bool run_case(const Case& cs, std::mt19937& rng, bool bwd, bool verbose) {
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t cells = cs.b * cs.c * cs.h * cs.w, K = cs.k;
  Buf x(cs.dt, cells), dy(cs.dt, cells);
  for (int64_t i = 0; i < cells; ++i) {
    x.set(i, nd(rng));
    dy.set(i, nd(rng));
  }
  std::vector<float> w(cs.c * K * K), bias(cs.c);
  for (auto& v : w) v = nd(rng) / K;
  for (auto& v : bias) v = nd(rng);
  const Ref r = reference(cs, x, w, bias, dy);
  const double tol = tol_of(cs.dt);

  DwConv2dArgs a;
  a.batch = cs.b; a.channels = cs.c; a.height = cs.h; a.width = cs.w; a.kh = a.kw = cs.k;
  a.dtype = cs.dt; a.x = x.data(); a.weight = w.data(); a.bias = cs.bias ? bias.data() : nullptr;
  a.device.index = 0;
  Buf y(cs.dt, cells);
  y.fill_nan();
  cuda::dwconv2d_forward(a, y.data());
  bool ok = close("y", y, as_buf(DType::kFloat32, r.y), tol, verbose);
  if (!bwd || !ok) return ok;

  std::vector<float> ws(static_cast<size_t>(cuda::dwconv2d_backward_workspace_floats(cs.b, cs.c, cs.h, cs.w, cs.k, cs.k)), NAN);
  Buf dx(cs.dt, cells), dw(DType::kFloat32, cs.c * K * K), db(DType::kFloat32, cs.c);
  dx.fill_nan();
  dw.fill_nan();
  db.fill_nan();
  cuda::dwconv2d_backward(a, dy.data(), dx.data(), static_cast<float*>(dw.data()), static_cast<float*>(db.data()), ws.data());
  // dweight and dbias are sums over b*h*w products: relative to their size, float32 sums.
  const double tol_sum = cs.dt == DType::kFloat32 ? 2e-4 : 1e-3;
  ok &= close("dx", dx, as_buf(DType::kFloat32, r.dx), tol, verbose);
  ok &= close("dweight", dw, as_buf(DType::kFloat32, r.dw), tol_sum, verbose);
  ok &= close("dbias", db, as_buf(DType::kFloat32, r.db), tol_sum, verbose);
  // dx alone (no workspace), then the sums alone (no dx).
  Buf dx2(cs.dt, cells);
  dx2.fill_nan();
  cuda::dwconv2d_backward(a, dy.data(), dx2.data(), nullptr, nullptr, nullptr);
  ok &= close("dx-only", dx2, as_buf(DType::kFloat32, r.dx), tol, verbose);
  Buf dw2(DType::kFloat32, cs.c * K * K);
  dw2.fill_nan();
  cuda::dwconv2d_backward(a, dy.data(), nullptr, static_cast<float*>(dw2.data()), nullptr, ws.data());
  ok &= close("dw-only", dw2, as_buf(DType::kFloat32, r.dw), tol_sum, verbose);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, o, "b,c,h,w,k,bias")) return 2;
  auto make = [&](std::mt19937& rng) {
    Case c;
    if (!o.only.empty()) {
      c.b = o.only[0]; c.c = o.only[1]; c.h = o.only[2]; c.w = o.only[3];
      c.k = static_cast<int>(o.only[4]); c.bias = o.only[5] != 0;
    } else {
      c.b = pick(rng, {1, 2});
      c.c = pick(rng, {1, 3, 5});
      c.h = pick(rng, {1, 2, 7, 17, 33});
      c.w = pick(rng, {1, 3, 9, 64, 70, 130});
      c.k = static_cast<int>(pick(rng, {3, 5, 7}));
      c.bias = rng() % 2;
    }
    c.dt = o.dt;
    return c;
  };
  auto describe = [](const Case& c) {
    char line[160];
    std::snprintf(line, sizeof line, "b=%lld c=%lld %lldx%lld k=%d bias=%d", (long long)c.b, (long long)c.c,
                  (long long)c.h, (long long)c.w, c.k, c.bias);
    return std::string(line);
  };
  return run_cases<Case>(o, make, describe, [&](const Case& c, std::mt19937& rng) { return run_case(c, rng, o.bwd, o.verbose); });
}
