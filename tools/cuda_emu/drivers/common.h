// What the cuda_emu drivers share: typed host buffers, the comparison, the command line.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "ssm2d/half.h"
#include "ssm2d/ops.h"

namespace emu_driver {

using ssm2d::DType;

// A host array of float32 / bfloat16 / float16 values, read and written as float.
struct Buf {
  DType dt = DType::kFloat32;
  std::vector<unsigned char> bytes;
  int64_t n = 0;
  Buf() = default;
  Buf(DType t, int64_t count) : dt(t), bytes(static_cast<size_t>(count) * ssm2d::dtype_size(t)), n(count) {}
  void* data() { return bytes.data(); }
  float get(int64_t i) const {
    switch (dt) {
      case DType::kFloat32: { float v; std::memcpy(&v, &bytes[i * 4], 4); return v; }
      case DType::kBFloat16: { ssm2d::cpu::bfloat16_t v; std::memcpy(&v, &bytes[i * 2], 2); return ssm2d::cpu::to_float(v); }
      case DType::kFloat16: { ssm2d::cpu::half_t v; std::memcpy(&v, &bytes[i * 2], 2); return ssm2d::cpu::to_float(v); }
      default: std::abort();
    }
  }
  void set(int64_t i, float x) {
    switch (dt) {
      case DType::kFloat32: std::memcpy(&bytes[i * 4], &x, 4); break;
      case DType::kBFloat16: { auto v = ssm2d::cpu::from_float_bf16(x); std::memcpy(&bytes[i * 2], &v, 2); break; }
      case DType::kFloat16: { auto v = ssm2d::cpu::from_float_half(x); std::memcpy(&bytes[i * 2], &v, 2); break; }
      default: std::abort();
    }
  }
  void zero() { std::memset(bytes.data(), 0, bytes.size()); }
  void fill_nan() { std::memset(bytes.data(), 0xFF, bytes.size()); }  // what a kernel leaves unwritten shows
};

inline Buf floats(const std::vector<float>& v) {
  Buf b(DType::kFloat32, static_cast<int64_t>(v.size()));
  std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

// Tolerance of a result rounded to `t` (relative, see close).
inline double tol_of(DType t) { return t == DType::kFloat32 ? 2e-4 : t == DType::kBFloat16 ? 2e-2 : 4e-3; }

// Max |a - r| / (|r| + 1e-2 * max|r|): relative, without blowing up where the reference crosses zero.
// A non-finite value of `a` always fails.
inline bool close(const char* what, const Buf& a, const Buf& r, double tol, bool verbose) {
  double scale = 0.0;
  for (int64_t i = 0; i < r.n; ++i) scale = std::max(scale, std::fabs(static_cast<double>(r.get(i))));
  double worst = 0.0;
  int64_t at = -1;
  for (int64_t i = 0; i < r.n; ++i) {
    const double x = a.get(i), y = r.get(i);
    const double e = std::isfinite(x) ? std::fabs(x - y) / (std::fabs(y) + 1e-2 * scale + 1e-30) : INFINITY;
    if (!(e <= worst)) { worst = e; at = i; }
  }
  const bool ok = worst <= tol;
  if (!ok || verbose)
    std::printf("    %-8s max rel err %.3g%s (at %lld: %.6g vs %.6g)\n", what, worst, ok ? "" : "  MISMATCH",
                static_cast<long long>(at), at >= 0 ? a.get(at) : 0.0, at >= 0 ? r.get(at) : 0.0);
  return ok;
}

// --seed S --cases K --bwd --verbose --dtype f32|bf16|f16 --only SIZES (six comma-separated ints).
struct Options {
  unsigned seed = 1;
  int cases = 8;
  bool bwd = false, verbose = false;
  DType dt = DType::kFloat32;
  std::vector<int64_t> only;
};

inline bool parse(int argc, char** argv, Options& o, const char* sizes) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seed" && i + 1 < argc) o.seed = static_cast<unsigned>(std::stoul(argv[++i]));
    else if (a == "--cases" && i + 1 < argc) o.cases = std::stoi(argv[++i]);
    else if (a == "--bwd") o.bwd = true;
    else if (a == "--verbose") o.verbose = true;
    else if (a == "--dtype" && i + 1 < argc) {
      const std::string t = argv[++i];
      o.dt = t == "bf16" ? DType::kBFloat16 : t == "f16" ? DType::kFloat16 : DType::kFloat32;
    } else if (a == "--only" && i + 1 < argc) {
      const std::string s = argv[++i];
      size_t pos = 0;
      while (pos <= s.size()) {
        const size_t e = s.find(',', pos);
        o.only.push_back(std::stoll(s.substr(pos, e - pos)));
        if (e == std::string::npos) break;
        pos = e + 1;
      }
      if (o.only.size() != 6) {
        std::fprintf(stderr, "--only takes %s\n", sizes);
        return false;
      }
    } else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return false;
    }
  }
  return true;
}

// Runs o.cases cases: make(rng) draws one (from o.only's sizes when given), describe(c) is its line,
// run(c, rng) checks it. Prints "K of N cases failed"; returns the exit status (1 if any failed).
template <typename Case>
int run_cases(const Options& o, const std::function<Case(std::mt19937&)>& make,
              const std::function<std::string(const Case&)>& describe,
              const std::function<bool(const Case&, std::mt19937&)>& run) {
  std::mt19937 rng(o.seed);
  int failed = 0;
  for (int k = 0; k < o.cases; ++k) {
    const Case c = make(rng);
    std::printf("case %d: %s\n", k, describe(c).c_str());
    std::fflush(stdout);
    const bool ok = run(c, rng);
    std::printf("  %s\n", ok ? "ok" : "FAILED");
    std::fflush(stdout);
    if (!ok) ++failed;
  }
  std::printf("%d of %d cases failed\n", failed, o.cases);
  return failed ? 1 : 0;
}

// One random element of `v`.
inline int64_t pick(std::mt19937& rng, std::initializer_list<int64_t> v) { return *(v.begin() + rng() % v.size()); }

}  // namespace emu_driver
