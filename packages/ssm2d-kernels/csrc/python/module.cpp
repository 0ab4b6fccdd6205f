// The Python face of ssm2d-kernels. Only this file includes pybind11; it validates arguments,
// releases the GIL around real work and forwards to the CPU or CUDA implementations.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ssm2d/cuda_api.h"
#include "ssm2d/ops.h"
#include "ssm2d/parallel.h"

#ifndef SSM2D_VERSION
#define SSM2D_VERSION "0+unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "ssm2d-kernels compiled core (C++ CPU kernels and, when built with CUDA, CUDA kernels)";
  m.attr("__version__") = SSM2D_VERSION;

  py::register_exception<ssm2d::ArgumentError>(m, "ArgumentError", PyExc_ValueError);

  m.def("build_info_raw", [] {
    py::dict d;
    d["version"] = SSM2D_VERSION;
    d["cuda"] = ssm2d::cuda::compiled();
    d["cuda_architectures"] = ssm2d::cuda::compiled_architectures();
    d["cuda_runtime_version"] = ssm2d::cuda::runtime_version();
#if defined(__VERSION__)
    d["cxx_compiler"] = __VERSION__;
#endif
    return d;
  });

  m.def("cuda_device_count", &ssm2d::cuda::device_count,
        "Number of usable CUDA devices; 0 without a GPU, a driver or a CUDA build (never raises).");
  m.def("cuda_driver_version", &ssm2d::cuda::driver_version, "CUDA driver version (e.g. 13000), 0 without a driver.");

  m.def(
      "cuda_device_properties",
      [](int device) {
        auto p = ssm2d::cuda::device_properties(device);
        py::dict d;
        d["index"] = p.index;
        d["name"] = p.name;
        d["capability"] = py::make_tuple(p.major, p.minor);
        d["multiprocessors"] = p.multiprocessors;
        d["total_memory"] = p.total_memory;
        d["l2_cache_bytes"] = p.l2_cache_bytes;
        d["shared_memory_per_block_optin"] = p.shared_memory_per_block_optin;
        return d;
      },
      py::arg("device"));

  m.def(
      "cuda_selftest",
      [](int device, long long elements) {
        ssm2d::cuda::SelftestResult r;
        {
          py::gil_scoped_release nogil;
          r = ssm2d::cuda::selftest(device, elements);
        }
        py::dict d;
        d["ok"] = r.ok;
        d["elements"] = r.elements;
        d["max_abs_error"] = r.max_abs_error;
        return d;
      },
      py::arg("device") = 0, py::arg("elements") = 1 << 20);

  m.def(
      "cpu_selftest",
      [](long long elements) {
        ssm2d::cpu::CpuSelftest r;
        {
          py::gil_scoped_release nogil;
          r = ssm2d::cpu::selftest(elements);
        }
        py::dict d;
        d["ok"] = r.ok;
        d["threads"] = r.threads;
        d["elements"] = r.elements;
        return d;
      },
      py::arg("elements") = 1 << 22);

  m.def("get_num_threads", &ssm2d::cpu::get_num_threads, "Threads the CPU kernels use.");
  m.def("set_num_threads", &ssm2d::cpu::set_num_threads, py::arg("n"),
        "Threads for the CPU kernels; n <= 0 restores the default (SSM2D_NUM_THREADS or all cores).");
}
