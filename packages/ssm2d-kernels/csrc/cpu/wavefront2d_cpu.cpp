// wavefront2d on the CPU: row by row, each cell from its left and top neighbours, exactly as
// SCANS.md section 2 writes the recurrence. One (batch, channel) per task, parallel over tasks.
#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "grid_access.h"
#include "ssm2d/half.h"
#include "ssm2d/parallel.h"
#include "ssm2d/wavefront2d.h"

namespace ssm2d::cpu {
namespace {

template <typename T, typename Acc>
using At = GridAccess<T, Acc>;

// Border rule: the first row takes only its left term, the first column only its top term (the
// origin its left input), the interior averages the two.
template <typename Acc>
inline void coefficients(int64_t i, int64_t j, bool origin_top, Acc& cL, Acc& cT) {
  if (i == 0 && j == 0 && origin_top) { cL = 0; cT = 1; }  // a transposed call (see ops.h)
  else if (i == 0) { cL = 1; cT = 0; }
  else if (j == 0) { cL = 0; cT = 1; }
  else { cL = Acc(0.5); cT = Acc(0.5); }
}

template <typename T, typename Acc>
struct Cells {  // per (b, e): u, dT, dL on the grid
  std::vector<Acc> u, dT, dL;
  void load(const Wave2dProblem& p, int64_t b, int64_t e) {
    const int64_t H = p.height, W = p.width;
    u.resize(H * W); dT.resize(H * W); dL.resize(H * W);
    At<T, Acc> gu{p.u}, gT{p.dT}, gL{p.dL};
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        u[i * W + j] = gu.load(b, e, 0, i, j);
        dT[i * W + j] = gT.load(b, e, 0, i, j);
        dL[i * W + j] = gL.load(b, e, 0, i, j);
      }
  }
};

// h of state n on the whole grid (H * W values).
template <typename T, typename Acc, typename P>
void forward_state(const Wave2dProblem& p, const Cells<T, Acc>& c, int64_t b, int64_t e, int64_t n,
                   std::vector<Acc>& h) {
  const int64_t H = p.height, W = p.width, g = e / (p.dim / p.groups);
  const Acc AT = static_cast<Acc>(static_cast<const P*>(p.AT)[e * p.A_sd + n * p.A_sn]);
  const Acc AL = static_cast<Acc>(static_cast<const P*>(p.AL)[e * p.AL_sd + n * p.AL_sn]);
  At<T, Acc> gBT{p.BT}, gBL{p.BL};
  h.resize(H * W);
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; ++j) {
      const int64_t x = i * W + j;
      Acc cL, cT;
      coefficients(i, j, p.origin_top, cL, cT);
      Acc v = 0;
      if (cL != 0) {
        const Acc left = j > 0 ? h[x - 1] : Acc(0);
        v += cL * (std::exp(c.dL[x] * AL) * left + c.dL[x] * gBL.load(b, g, n, i, j) * c.u[x]);
      }
      if (cT != 0) {
        const Acc top = i > 0 ? h[x - W] : Acc(0);
        v += cT * (std::exp(c.dT[x] * AT) * top + c.dT[x] * gBT.load(b, g, n, i, j) * c.u[x]);
      }
      h[x] = v;
    }
}

template <typename T, typename Acc, typename P>
void forward_impl(const Wave2dProblem& p, const Grid& out) {
  const int64_t H = p.height, W = p.width, per_group = p.dim / p.groups;
  parallel_for(0, p.batch * p.dim, 1, [&](int64_t lo, int64_t hi) {
    Cells<T, Acc> c;
    std::vector<Acc> h, y;
    At<T, Acc> gC{p.C};
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / p.dim, e = task % p.dim, g = e / per_group;
      c.load(p, b, e);
      const Acc Dd = p.D ? static_cast<Acc>(static_cast<const P*>(p.D)[e]) : Acc(0);
      y.assign(H * W, Acc(0));
      for (int64_t x = 0; x < H * W; ++x) y[x] = Dd * c.u[x];
      for (int64_t n = 0; n < p.dstate; ++n) {
        forward_state<T, Acc, P>(p, c, b, e, n, h);
        for (int64_t i = 0; i < H; ++i)
          for (int64_t j = 0; j < W; ++j) y[i * W + j] += gC.load(b, g, n, i, j) * h[i * W + j];
      }
      for (int64_t i = 0; i < H; ++i)  // out is an accumulation buffer: add
        for (int64_t j = 0; j < W; ++j)
          static_cast<Acc*>(out.data)[b * out.sb + e * out.sc + i * out.si + j * out.sj] += y[i * W + j];
    }
  });
}

template <typename T, typename Acc, typename P>
void backward_impl(const Wave2dProblem& p, const Wave2dBackwardArgs& ga) {
  const int64_t H = p.height, W = p.width, N = p.dstate, per_group = p.dim / p.groups;
  const int64_t bc_size = p.batch * p.groups * N * H * W;
  const bool want_bc = ga.dBT.defined() || ga.dBL.defined() || ga.dC.defined();
  std::vector<std::vector<Acc>> priv;  // per chunk: dBT, dBL, dC back to back
  std::vector<std::pair<int64_t, size_t>> order;
  std::mutex m;
  parallel_for(0, p.batch * p.dim, 1, [&](int64_t lo, int64_t hi) {
    std::vector<Acc> acc;
    if (want_bc) acc.assign(3 * bc_size, Acc(0));
    Cells<T, Acc> c;
    std::vector<Acc> h, du, ddT, ddL, dy, col;
    At<T, Acc> gBT{p.BT}, gBL{p.BL}, gC{p.C}, gdout{ga.dout};
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / p.dim, e = task % p.dim, g = e / per_group;
      c.load(p, b, e);
      const Acc Dd = p.D ? static_cast<Acc>(static_cast<const P*>(p.D)[e]) : Acc(0);
      dy.resize(H * W); du.resize(H * W); ddT.assign(H * W, Acc(0)); ddL.assign(H * W, Acc(0));
      Acc dD = 0;
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) {
          const int64_t x = i * W + j;
          dy[x] = gdout.load(b, e, 0, i, j);
          dD += dy[x] * c.u[x];
          du[x] = Dd * dy[x];
        }
      for (int64_t n = 0; n < N; ++n) {
        forward_state<T, Acc, P>(p, c, b, e, n, h);
        const Acc AT = static_cast<Acc>(static_cast<const P*>(p.AT)[e * p.A_sd + n * p.A_sn]);
        const Acc AL = static_cast<Acc>(static_cast<const P*>(p.AL)[e * p.AL_sd + n * p.AL_sn]);
        Acc* aBT = want_bc ? &acc[((b * p.groups + g) * N + n) * H * W] : nullptr;
        Acc* aBL = want_bc ? aBT + bc_size : nullptr;
        Acc* aC = want_bc ? aBT + 2 * bc_size : nullptr;
        col.assign(W, Acc(0));  // aT*cT*lam of the row below, per column
        Acc dAT = 0, dAL = 0;
        for (int64_t i = H - 1; i >= 0; --i) {
          Acc row = 0;  // aL*cL*lam of the cell to the right
          for (int64_t j = W - 1; j >= 0; --j) {
            const int64_t x = i * W + j;
            Acc cL, cT;
            coefficients(i, j, p.origin_top, cL, cT);
            const Acc Cv = gC.load(b, g, n, i, j);
            const Acc lam = dy[x] * Cv + row + col[j];
            if (aC) aC[x] += dy[x] * h[x];
            Acc next_row = 0, next_col = 0;
            if (cL != 0) {
              const Acc aL = std::exp(c.dL[x] * AL), BL = gBL.load(b, g, n, i, j);
              const Acc w = cL * lam, left = j > 0 ? h[x - 1] : Acc(0);
              const Acc q = w * aL * left;  // a * dL/da
              dAL += q * c.dL[x];
              ddL[x] += q * AL + w * BL * c.u[x];
              du[x] += w * BL * c.dL[x];
              if (aBL) aBL[x] += w * c.dL[x] * c.u[x];
              next_row = aL * w;
            }
            if (cT != 0) {
              const Acc aT = std::exp(c.dT[x] * AT), BT = gBT.load(b, g, n, i, j);
              const Acc w = cT * lam, top = i > 0 ? h[x - W] : Acc(0);
              const Acc q = w * aT * top;
              dAT += q * c.dT[x];
              ddT[x] += q * AT + w * BT * c.u[x];
              du[x] += w * BT * c.dT[x];
              if (aBT) aBT[x] += w * c.dT[x] * c.u[x];
              next_col = aT * w;
            }
            row = next_row;
            col[j] = next_col;
          }
        }
        if (ga.dAT_part) static_cast<Acc*>(ga.dAT_part)[(b * p.dim + e) * N + n] = dAT;
        if (ga.dAL_part) static_cast<Acc*>(ga.dAL_part)[(b * p.dim + e) * N + n] = dAL;
      }
      if (ga.dD_part) static_cast<Acc*>(ga.dD_part)[b * p.dim + e] = dD;
      const Grid* cell_outs[3] = {&ga.du, &ga.ddT, &ga.ddL};
      const std::vector<Acc>* cell_vals[3] = {&du, &ddT, &ddL};
      for (int k = 0; k < 3; ++k) {  // accumulation buffers: add
        const Grid& o = *cell_outs[k];
        if (!o.defined()) continue;
        for (int64_t i = 0; i < H; ++i)
          for (int64_t j = 0; j < W; ++j)
            static_cast<Acc*>(o.data)[b * o.sb + e * o.sc + i * o.si + j * o.sj] += (*cell_vals[k])[i * W + j];
      }
    }
    if (want_bc) {
      std::lock_guard<std::mutex> lock(m);
      order.emplace_back(lo, priv.size());
      priv.push_back(std::move(acc));
    }
  });
  if (!want_bc) return;
  std::sort(order.begin(), order.end());
  const Grid* outs[3] = {&ga.dBT, &ga.dBL, &ga.dC};
  parallel_for(0, bc_size, 1 << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t j = x % W, i = (x / W) % H, n = (x / (W * H)) % N, g = (x / (W * H * N)) % p.groups,
                    b = x / (W * H * N * p.groups);
      for (int k = 0; k < 3; ++k) {
        if (!outs[k]->defined()) continue;
        Acc s = 0;
        for (const auto& [start, idx] : order) s += priv[idx][k * bc_size + x];
        const Grid& o = *outs[k];
        static_cast<Acc*>(o.data)[b * o.sb + g * o.sc + n * o.sn + i * o.si + j * o.sj] += s;
      }
    }
  });
}

template <typename T, typename Acc, typename P>
struct Fwd { static void run(const Wave2dProblem& p, const Grid& o) { forward_impl<T, Acc, P>(p, o); } };
template <typename T, typename Acc, typename P>
struct Bwd { static void run(const Wave2dProblem& p, const Wave2dBackwardArgs& g) { backward_impl<T, Acc, P>(p, g); } };

template <template <typename, typename, typename> class Fn, typename Arg>
void dispatch(const Wave2dProblem& p, const Arg& a) {
  switch (p.dtype) {
    case DType::kFloat64: Fn<double, double, double>::run(p, a); break;
    case DType::kFloat32: Fn<float, float, float>::run(p, a); break;
    case DType::kFloat16: Fn<half_t, float, float>::run(p, a); break;
    case DType::kBFloat16: Fn<bfloat16_t, float, float>::run(p, a); break;
  }
}

}  // namespace

void wavefront2d_forward(const Wave2dProblem& p, const Grid& out) { dispatch<Fwd>(p, out); }
void wavefront2d_backward(const Wave2dProblem& p, const Wave2dBackwardArgs& g) { dispatch<Bwd>(p, g); }

}  // namespace ssm2d::cpu
