// Element access of a Grid in the CPU kernels: load/store of (b, c, n, i, j) with conversion
// between the storage type T and the accumulation type Acc.
#pragma once

#include "ssm2d/half.h"
#include "ssm2d/ops.h"

namespace ssm2d::cpu {

template <typename T, typename Acc>
struct GridAccess {
  const Grid& g;
  Acc load(int64_t b, int64_t c, int64_t n, int64_t i, int64_t j) const {
    return static_cast<Acc>(Convert<T>::load(
        static_cast<const T*>(g.data)[b * g.sb + c * g.sc + n * g.sn + i * g.si + j * g.sj]));
  }
  void store(int64_t b, int64_t c, int64_t n, int64_t i, int64_t j, Acc v) const {
    static_cast<T*>(g.data)[b * g.sb + c * g.sc + n * g.sn + i * g.si + j * g.sj] =
        Convert<T>::store(static_cast<decltype(Convert<T>::load(T{}))>(v));
  }
};

}  // namespace ssm2d::cpu
