// scan2d on the CPU: the same loop structure as the math of SCANS.md section 1, one (batch,
// channel) per task, parallel over tasks. Accumulates in float (double for float64 inputs).
#include <cmath>
#include <algorithm>
#include <mutex>
#include <vector>

#include "grid_access.h"
#include "ssm2d/half.h"
#include "ssm2d/parallel.h"
#include "ssm2d/scan2d.h"

namespace ssm2d::cpu {
namespace {

template <typename Acc>
inline Acc softplus(Acc v) { return v > Acc(20) ? v : std::log1p(std::exp(v)); }
template <typename Acc>
inline Acc sigmoid(Acc v) { return Acc(1) / (Acc(1) + std::exp(-v)); }

// Per-(batch, channel) inputs every state shares: dt, dt*u and u on the whole grid.
template <typename T, typename Acc, typename P>
struct ChannelInputs {
  std::vector<Acc> dt, dtu, u;
  void load(const Scan2dProblem& p, int64_t b, int64_t d) {
    const int64_t H = p.height, W = p.width;
    dt.resize(H * W); dtu.resize(H * W); u.resize(H * W);
    GridAccess<T, Acc> gu{p.u}, gdelta{p.delta};
    const Acc bias = p.delta_bias ? static_cast<Acc>(static_cast<const P*>(p.delta_bias)[d]) : Acc(0);
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        const Acc v = gdelta.load(b, d, 0, i, j) + bias;
        const Acc t = p.softplus ? softplus(v) : v;
        const Acc uv = gu.load(b, d, 0, i, j);
        dt[i * W + j] = t; u[i * W + j] = uv; dtu[i * W + j] = t * uv;
      }
  }
};

// Runs the forward recurrence of one (b, d) for every state. Calls keep(n, cell, G, h) per cell.
template <typename T, typename Acc, typename P, typename Keep>
void forward_channel(const Scan2dProblem& p, const ChannelInputs<T, Acc, P>& in, int64_t b, int64_t d,
                     std::vector<Acc>& hcol, Keep&& keep) {
  const int64_t H = p.height, W = p.width, g = d / (p.dim / p.groups);
  GridAccess<T, Acc> gB{p.B};
  hcol.assign(W, Acc(0));
  for (int64_t n = 0; n < p.dstate; ++n) {
    const Acc An = static_cast<Acc>(static_cast<const P*>(p.A)[d * p.A_sd + n * p.A_sn]);
    std::fill(hcol.begin(), hcol.end(), Acc(0));
    for (int64_t i = 0; i < H; ++i) {
      Acc G = 0;
      for (int64_t j = 0; j < W; ++j) {
        const int64_t c = i * W + j;
        const Acc a = std::exp(in.dt[c] * An);
        G = a * G + in.dtu[c] * gB.load(b, g, n, i, j);
        const Acc h = a * hcol[j] + G;
        hcol[j] = h;
        keep(n, c, G, h);
      }
    }
  }
}

template <typename T, typename Acc, typename P>
void forward_impl(const Scan2dProblem& p, const Scan2dForwardOutputs& o) {
  const int64_t H = p.height, W = p.width, per_group = p.dim / p.groups;
  parallel_for(0, p.batch * p.dim, 1, [&](int64_t lo, int64_t hi) {
    ChannelInputs<T, Acc, P> in;
    std::vector<Acc> y, hcol;
    GridAccess<T, Acc> gC{p.C}, gz{p.z}, gout{o.out}, gy{o.y};
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / p.dim, d = task % p.dim, g = d / per_group;
      in.load(p, b, d);
      y.assign(H * W, Acc(0));
      forward_channel<T, Acc, P>(p, in, b, d, hcol, [&](int64_t n, int64_t c, Acc, Acc h) {
        y[c] += gC.load(b, g, n, c / W, c % W) * h;
      });
      const Acc Dd = p.D ? static_cast<Acc>(static_cast<const P*>(p.D)[d]) : Acc(0);
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) {
          const Acc yv = y[i * W + j] + Dd * in.u[i * W + j];
          if (p.z.defined()) {
            const Acc zv = gz.load(b, d, 0, i, j);
            gout.store(b, d, 0, i, j, yv * zv * sigmoid(zv));
            if (o.y.defined()) gy.store(b, d, 0, i, j, yv);
          } else {
            gout.store(b, d, 0, i, j, yv);
          }
        }
    }
  });
}

template <typename T, typename Acc, typename P>
void backward_impl(const Scan2dProblem& p, const Scan2dBackwardArgs& ga) {
  const int64_t H = p.height, W = p.width, N = p.dstate, per_group = p.dim / p.groups;
  const int64_t bc_size = p.batch * p.groups * N * H * W;  // one dB or dC, contiguous (b, g, n, i, j)
  const bool want_bc = ga.dB.defined() || ga.dC.defined();
  std::vector<std::vector<Acc>> privB, privC;  // per chunk of tasks: deterministic final sum
  std::mutex reg_mutex;
  std::vector<std::pair<int64_t, size_t>> chunk_order;
  parallel_for(0, p.batch * p.dim, 1, [&](int64_t lo, int64_t hi) {
    std::vector<Acc> accB, accC;
    if (want_bc) { accB.assign(bc_size, Acc(0)); accC.assign(bc_size, Acc(0)); }
    ChannelInputs<T, Acc, P> in;
    std::vector<Acc> Gs, hs, hcol, dy, ddt, du, cV;
    GridAccess<T, Acc> gB{p.B}, gC{p.C}, gz{p.z}, gdout{ga.dout};
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / p.dim, d = task % p.dim, g = d / per_group;
      in.load(p, b, d);
      Gs.resize(N * H * W); hs.resize(N * H * W);
      std::vector<Acc> y(H * W, Acc(0));
      forward_channel<T, Acc, P>(p, in, b, d, hcol, [&](int64_t n, int64_t c, Acc G, Acc h) {
        Gs[n * H * W + c] = G; hs[n * H * W + c] = h;
        y[c] += gC.load(b, g, n, c / W, c % W) * h;
      });
      const Acc Dd = p.D ? static_cast<Acc>(static_cast<const P*>(p.D)[d]) : Acc(0);
      dy.resize(H * W); ddt.assign(H * W, Acc(0)); du.resize(H * W);
      Acc dD = 0;
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) {
          const int64_t c = i * W + j;
          const Acc go = gdout.load(b, d, 0, i, j);
          if (p.z.defined()) {
            const Acc zv = gz.load(b, d, 0, i, j), s = sigmoid(zv), yv = y[c] + Dd * in.u[c];
            dy[c] = go * zv * s;
            if (ga.dz.defined()) GridAccess<T, Acc>{ga.dz}.store(b, d, 0, i, j, go * yv * s * (Acc(1) + zv * (Acc(1) - s)));
          } else {
            dy[c] = go;
          }
          dD += dy[c] * in.u[c];
          du[c] = Dd * dy[c];
        }
      for (int64_t n = 0; n < N; ++n) {
        const Acc An = static_cast<Acc>(static_cast<const P*>(p.A)[d * p.A_sd + n * p.A_sn]);
        const Acc* G = &Gs[n * H * W];
        const Acc* h = &hs[n * H * W];
        Acc* aB = want_bc ? &accB[((b * p.groups + g) * N + n) * H * W] : nullptr;
        Acc* aC = want_bc ? &accC[((b * p.groups + g) * N + n) * H * W] : nullptr;
        cV.assign(W, Acc(0));
        Acc dA = 0;
        for (int64_t i = H - 1; i >= 0; --i) {
          Acc cH = 0;
          for (int64_t j = W - 1; j >= 0; --j) {
            const int64_t c = i * W + j;
            const Acc a = std::exp(in.dt[c] * An), Bv = gB.load(b, g, n, i, j), x = in.dtu[c] * Bv;
            const Acc lamV = dy[c] * gC.load(b, g, n, i, j) + cV[j];
            const Acc lamH = lamV + cH;
            const Acc q = lamV * (h[c] - G[c]) + lamH * (G[c] - x);
            dA += q * in.dt[c];
            ddt[c] += q * An + lamH * Bv * in.u[c];
            du[c] += lamH * Bv * in.dt[c];
            if (aB) { aB[c] += lamH * in.dtu[c]; aC[c] += dy[c] * h[c]; }
            cV[j] = a * lamV;
            cH = a * lamH;
          }
        }
        if (ga.dA_part) static_cast<Acc*>(ga.dA_part)[(b * p.dim + d) * N + n] = dA;
      }
      const Acc bias = p.delta_bias ? static_cast<Acc>(static_cast<const P*>(p.delta_bias)[d]) : Acc(0);
      Acc dbias = 0;
      GridAccess<T, Acc> gdelta{p.delta};
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) {
          const int64_t c = i * W + j;
          Acc dd = ddt[c];
          if (p.softplus) {
            const Acc v = gdelta.load(b, d, 0, i, j) + bias;
            if (v <= Acc(20)) dd *= sigmoid(v);
          }
          dbias += dd;
          if (ga.ddelta.defined()) GridAccess<T, Acc>{ga.ddelta}.store(b, d, 0, i, j, dd);
          if (ga.du.defined()) GridAccess<T, Acc>{ga.du}.store(b, d, 0, i, j, du[c]);
        }
      if (ga.dD_part) static_cast<Acc*>(ga.dD_part)[b * p.dim + d] = dD;
      if (ga.ddelta_bias_part) static_cast<Acc*>(ga.ddelta_bias_part)[b * p.dim + d] = dbias;
    }
    if (want_bc) {
      std::lock_guard<std::mutex> lock(reg_mutex);
      chunk_order.emplace_back(lo, privB.size());
      privB.push_back(std::move(accB));
      privC.push_back(std::move(accC));
    }
  });
  if (!want_bc) return;
  // Sum the private accumulators in task order, whatever order the threads finished in.
  std::sort(chunk_order.begin(), chunk_order.end());
  parallel_for(0, bc_size, 1 << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) {
      Acc sB = 0, sC = 0;
      for (const auto& [start, k] : chunk_order) { sB += privB[k][e]; sC += privC[k][e]; }
      const int64_t j = e % W, i = (e / W) % H, n = (e / (W * H)) % N, g = (e / (W * H * N)) % p.groups,
                    b = e / (W * H * N * p.groups);
      // dB/dC are float32 (or float64 for float64 inputs) accumulation buffers.
      if (ga.dB.defined()) {
        auto* dst = static_cast<Acc*>(ga.dB.data) + b * ga.dB.sb + g * ga.dB.sc + n * ga.dB.sn + i * ga.dB.si + j * ga.dB.sj;
        *dst += sB;
      }
      if (ga.dC.defined()) {
        auto* dst = static_cast<Acc*>(ga.dC.data) + b * ga.dC.sb + g * ga.dC.sc + n * ga.dC.sn + i * ga.dC.si + j * ga.dC.sj;
        *dst += sC;
      }
    }
  });
}

template <template <typename, typename, typename> class Fn, typename... Args>
void dispatch(const Scan2dProblem& p, Args&&... args) {
  switch (p.dtype) {
    case DType::kFloat64: Fn<double, double, double>::run(p, args...); break;
    case DType::kFloat32: Fn<float, float, float>::run(p, args...); break;
    case DType::kFloat16: Fn<half_t, float, float>::run(p, args...); break;
    case DType::kBFloat16: Fn<bfloat16_t, float, float>::run(p, args...); break;
  }
}

template <typename T, typename Acc, typename P>
struct Fwd { static void run(const Scan2dProblem& p, const Scan2dForwardOutputs& o) { forward_impl<T, Acc, P>(p, o); } };
template <typename T, typename Acc, typename P>
struct Bwd { static void run(const Scan2dProblem& p, const Scan2dBackwardArgs& g) { backward_impl<T, Acc, P>(p, g); } };

}  // namespace

void scan2d_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o) { dispatch<Fwd>(p, o); }
void scan2d_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& g) { dispatch<Bwd>(p, g); }

}  // namespace ssm2d::cpu
