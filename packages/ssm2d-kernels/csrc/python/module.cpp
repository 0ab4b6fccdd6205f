// The Python face of ssm2d-kernels. Only this file includes pybind11; it validates arguments,
// releases the GIL around real work and forwards to the CPU or CUDA implementations.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ssm2d/cuda_api.h"
#include "ssm2d/dwconv2d.h"
#include "ssm2d/layer_norm.h"
#include "ssm2d/star_relu.h"
#include "ssm2d/ops.h"
#include "ssm2d/parallel.h"
#include "ssm2d/scan2d.h"
#include "ssm2d/wavefront2d.h"

#ifndef SSM2D_VERSION
#define SSM2D_VERSION "0+unknown"
#endif

namespace py = pybind11;

namespace {

// Descriptors arrive from ssm2d_kernels/scan2d.py as plain tuples and ints (already validated
// there): a grid is (data_ptr, sb, sc, sn, si, sj) in elements, or None.
ssm2d::Grid to_grid(py::handle h) {
  ssm2d::Grid g;
  if (h.is_none()) return g;
  auto t = h.cast<py::tuple>();
  if (t.size() != 6) throw ssm2d::ArgumentError("internal: a grid descriptor has 6 fields");
  g.data = reinterpret_cast<void*>(t[0].cast<std::uintptr_t>());
  g.sb = t[1].cast<int64_t>(); g.sc = t[2].cast<int64_t>(); g.sn = t[3].cast<int64_t>();
  g.si = t[4].cast<int64_t>(); g.sj = t[5].cast<int64_t>();
  return g;
}

template <typename T = void>
T* to_ptr(py::handle h) {
  return h.is_none() ? nullptr : reinterpret_cast<T*>(h.cast<std::uintptr_t>());
}

ssm2d::Scan2dProblem to_problem(const py::dict& d) {
  ssm2d::Scan2dProblem p;
  p.batch = d["batch"].cast<int64_t>(); p.dim = d["dim"].cast<int64_t>(); p.dstate = d["dstate"].cast<int64_t>();
  p.groups = d["groups"].cast<int64_t>(); p.height = d["height"].cast<int64_t>(); p.width = d["width"].cast<int64_t>();
  p.dtype = static_cast<ssm2d::DType>(d["dtype"].cast<int>());
  p.param_dtype = static_cast<ssm2d::DType>(d["param_dtype"].cast<int>());
  p.softplus = d["softplus"].cast<bool>();
  p.u = to_grid(d["u"]); p.delta = to_grid(d["delta"]); p.z = to_grid(d["z"]);
  p.B = to_grid(d["B"]); p.C = to_grid(d["C"]);
  p.A = to_ptr(d["A"]); p.A_sd = d["A_sd"].cast<int64_t>(); p.A_sn = d["A_sn"].cast<int64_t>();
  p.D = to_ptr(d["D"]); p.delta_bias = to_ptr(d["delta_bias"]);
  p.device.index = d["device"].cast<int>();
  p.stream = d["stream"].cast<std::uintptr_t>();
  if (p.batch < 0 || p.dim < 1 || p.dstate < 1 || p.groups < 1 || p.dim % p.groups || p.height < 1 || p.width < 1)
    throw ssm2d::ArgumentError("internal: inconsistent scan2d sizes");
  return p;
}

ssm2d::Wave2dProblem to_wave_problem(const py::dict& d) {
  ssm2d::Wave2dProblem p;
  p.batch = d["batch"].cast<int64_t>(); p.dim = d["dim"].cast<int64_t>(); p.dstate = d["dstate"].cast<int64_t>();
  p.groups = d["groups"].cast<int64_t>(); p.height = d["height"].cast<int64_t>(); p.width = d["width"].cast<int64_t>();
  p.dtype = static_cast<ssm2d::DType>(d["dtype"].cast<int>());
  p.param_dtype = static_cast<ssm2d::DType>(d["param_dtype"].cast<int>());
  p.u = to_grid(d["u"]); p.dT = to_grid(d["dT"]); p.dL = to_grid(d["dL"]);
  p.BT = to_grid(d["BT"]); p.BL = to_grid(d["BL"]); p.C = to_grid(d["C"]);
  p.AT = to_ptr(d["AT"]); p.A_sd = d["AT_sd"].cast<int64_t>(); p.A_sn = d["AT_sn"].cast<int64_t>();
  p.AL = to_ptr(d["AL"]); p.AL_sd = d["AL_sd"].cast<int64_t>(); p.AL_sn = d["AL_sn"].cast<int64_t>();
  p.D = to_ptr(d["D"]);
  p.origin_top = d["origin_top"].cast<bool>();
  p.states_per_block = d["states_per_block"].cast<int64_t>();
  p.workspace = to_ptr<float>(d["workspace"]);
  p.device.index = d["device"].cast<int>();
  p.stream = d["stream"].cast<std::uintptr_t>();
  if (p.batch < 0 || p.dim < 1 || p.dstate < 1 || p.groups < 1 || p.dim % p.groups || p.height < 1 || p.width < 1)
    throw ssm2d::ArgumentError("internal: inconsistent wavefront2d sizes");
  return p;
}

// LayerNorm (CUDA only): pointers as ints, 0 for an absent operand; sizes checked by the kernels.
ssm2d::LayerNormArgs layer_norm_args(std::uintptr_t x, int64_t x_inner, int64_t x_rs, int64_t x_gs, std::uintptr_t weight, std::uintptr_t bias,
                                     std::uintptr_t mean, std::uintptr_t rstd, int64_t rows, int64_t cols, int dtype,
                                     double eps, int device, std::uintptr_t stream) {
  ssm2d::LayerNormArgs a;
  a.x = reinterpret_cast<const void*>(x); a.x_inner = x_inner; a.x_rs = x_rs; a.x_gs = x_gs;
  a.weight = reinterpret_cast<const float*>(weight); a.bias = reinterpret_cast<const float*>(bias);
  a.mean = reinterpret_cast<float*>(mean); a.rstd = reinterpret_cast<float*>(rstd);
  a.rows = rows; a.cols = cols;
  if (dtype < 0 || dtype > 3) throw ssm2d::ArgumentError("layer_norm: unknown dtype code " + std::to_string(dtype));
  a.dtype = static_cast<ssm2d::DType>(dtype);
  a.eps = static_cast<float>(eps);
  a.device.index = device;
  a.stream = stream;
  return a;
}

ssm2d::StarReluArgs star_relu_args(std::uintptr_t x, int64_t n, std::uintptr_t scale, std::uintptr_t bias, int dtype,
                                   int device, std::uintptr_t stream) {
  ssm2d::StarReluArgs a;
  a.x = reinterpret_cast<const void*>(x); a.n = n;
  a.scale = reinterpret_cast<const float*>(scale); a.bias = reinterpret_cast<const float*>(bias);
  if (dtype < 0 || dtype > 3) throw ssm2d::ArgumentError("star_relu: unknown dtype code " + std::to_string(dtype));
  a.dtype = static_cast<ssm2d::DType>(dtype);
  a.device.index = device;
  a.stream = stream;
  return a;
}

ssm2d::DwConv2dArgs dwconv2d_args(std::uintptr_t x, int64_t batch, int64_t channels, int64_t height, int64_t width,
                                   int kernel, std::uintptr_t weight, std::uintptr_t bias, int dtype, int device,
                                   std::uintptr_t stream) {
  ssm2d::DwConv2dArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.batch = batch; a.channels = channels; a.height = height; a.width = width;
  a.kh = a.kw = kernel;
  a.weight = reinterpret_cast<const float*>(weight); a.bias = reinterpret_cast<const float*>(bias);
  if (dtype < 0 || dtype > 3) throw ssm2d::ArgumentError("dwconv2d: unknown dtype code " + std::to_string(dtype));
  a.dtype = static_cast<ssm2d::DType>(dtype);
  a.device.index = device;
  a.stream = stream;
  return a;
}

// ---- Frames: a scan2d problem fixed once per argument layout --------------------------------------
// The torch ops (ssm2d-nn) check their arguments once per layout and keep each operand's layout as
// a byte offset from its data pointer plus strides. A frame holds that problem and the layouts of
// the results; a call adds the data pointers (ints, 0 for an absent operand) and checks nothing
// again: building dicts and looking their keys up cost more host time than the rest of a call.

// A layout: (byte offset from the data pointer, sb, sc, sn, si, sj); the offset may be negative.
ssm2d::Grid to_layout(py::handle h) {
  ssm2d::Grid g;
  if (h.is_none()) return g;
  auto t = h.cast<py::tuple>();
  if (t.size() != 6) throw ssm2d::ArgumentError("internal: a layout has 6 fields");
  g.data = reinterpret_cast<void*>(static_cast<std::intptr_t>(t[0].cast<int64_t>()));
  g.sb = t[1].cast<int64_t>(); g.sc = t[2].cast<int64_t>(); g.sn = t[3].cast<int64_t>();
  g.si = t[4].cast<int64_t>(); g.sj = t[5].cast<int64_t>();
  return g;
}

// The grid of a layout at a data pointer; undefined for a null pointer.
ssm2d::Grid at(const ssm2d::Grid& layout, std::uintptr_t ptr) {
  ssm2d::Grid g = layout;
  g.data = ptr ? reinterpret_cast<void*>(ptr + reinterpret_cast<std::uintptr_t>(layout.data)) : nullptr;
  return g;
}

struct Scan2dFrame {
  ssm2d::Scan2dProblem problem;  // u, delta, z, B, C hold layouts (offsets), no pointers
  ssm2d::Grid cell;              // out, y, du, dz, and dout when it is contiguous like u
  ssm2d::Grid ddelta;            // ddelta (the cell layout, or a slice of a larger buffer)
  ssm2d::Grid bc;                // dB, dC accumulators
};

Scan2dFrame make_scan2d_frame(const py::dict& d, py::handle u, py::handle delta, py::handle z, py::handle B,
                              py::handle C, py::handle cell, py::handle ddelta, py::handle bc) {
  Scan2dFrame f;
  auto& p = f.problem;
  p.batch = d["batch"].cast<int64_t>(); p.dim = d["dim"].cast<int64_t>(); p.dstate = d["dstate"].cast<int64_t>();
  p.groups = d["groups"].cast<int64_t>(); p.height = d["height"].cast<int64_t>(); p.width = d["width"].cast<int64_t>();
  p.dtype = static_cast<ssm2d::DType>(d["dtype"].cast<int>());
  p.param_dtype = static_cast<ssm2d::DType>(d["param_dtype"].cast<int>());
  p.device.index = d["device"].cast<int>();
  if (p.batch < 0 || p.dim < 1 || p.dstate < 1 || p.groups < 1 || p.dim % p.groups || p.height < 1 || p.width < 1)
    throw ssm2d::ArgumentError("internal: inconsistent scan2d sizes");
  p.u = to_layout(u); p.delta = to_layout(delta); p.z = to_layout(z); p.B = to_layout(B); p.C = to_layout(C);
  f.cell = to_layout(cell); f.ddelta = to_layout(ddelta); f.bc = to_layout(bc);
  return f;
}

// The problem of one call: the frame's layouts at the operands' pointers.
ssm2d::Scan2dProblem scan2d_problem_at(const Scan2dFrame& f, std::uintptr_t u, std::uintptr_t delta,
                                       std::uintptr_t z, std::uintptr_t B, std::uintptr_t C, std::uintptr_t A,
                                       int64_t A_sd, int64_t A_sn, std::uintptr_t D, std::uintptr_t delta_bias,
                                       bool softplus, std::uintptr_t stream) {
  ssm2d::Scan2dProblem p = f.problem;
  p.u = at(f.problem.u, u); p.delta = at(f.problem.delta, delta); p.z = at(f.problem.z, z);
  p.B = at(f.problem.B, B); p.C = at(f.problem.C, C);
  p.A = reinterpret_cast<const void*>(A); p.A_sd = A_sd; p.A_sn = A_sn;
  p.D = reinterpret_cast<const void*>(D); p.delta_bias = reinterpret_cast<const void*>(delta_bias);
  p.softplus = softplus;
  p.stream = stream;
  return p;
}

// The same for wavefront2d: operands in the kernel's slot order (u, dT, dL, BT, BL, C as scanned,
// T and L exchanged by the caller for a transposed call), AT / AL likewise.
struct Wave2dFrame {
  ssm2d::Wave2dProblem problem;  // u, dT, dL, BT, BL, C hold layouts (offsets), no pointers
  ssm2d::Grid cell;              // out, du, ddT, ddL accumulators
  ssm2d::Grid bn;                // dBT, dBL, dC accumulators
  ssm2d::Grid out;               // an output contiguous like u in u's dtype (forward_at with out_in_dtype)
};

Wave2dFrame make_wave2d_frame(const py::dict& d, py::handle u, py::handle dT, py::handle dL, py::handle BT,
                              py::handle BL, py::handle C, py::handle cell, py::handle bn, py::handle out) {
  Wave2dFrame f;
  auto& p = f.problem;
  p.batch = d["batch"].cast<int64_t>(); p.dim = d["dim"].cast<int64_t>(); p.dstate = d["dstate"].cast<int64_t>();
  p.groups = d["groups"].cast<int64_t>(); p.height = d["height"].cast<int64_t>(); p.width = d["width"].cast<int64_t>();
  p.dtype = static_cast<ssm2d::DType>(d["dtype"].cast<int>());
  p.param_dtype = static_cast<ssm2d::DType>(d["param_dtype"].cast<int>());
  p.origin_top = d["origin_top"].cast<bool>();
  p.states_per_block = d["states_per_block"].cast<int64_t>();
  p.device.index = d["device"].cast<int>();
  if (p.batch < 0 || p.dim < 1 || p.dstate < 1 || p.groups < 1 || p.dim % p.groups || p.height < 1 || p.width < 1)
    throw ssm2d::ArgumentError("internal: inconsistent wavefront2d sizes");
  p.u = to_layout(u); p.dT = to_layout(dT); p.dL = to_layout(dL);
  p.BT = to_layout(BT); p.BL = to_layout(BL); p.C = to_layout(C);
  f.cell = to_layout(cell); f.bn = to_layout(bn); f.out = to_layout(out);
  return f;
}

ssm2d::Wave2dProblem wave2d_problem_at(const Wave2dFrame& f, std::uintptr_t u, std::uintptr_t dT, std::uintptr_t dL,
                                       std::uintptr_t BT, std::uintptr_t BL, std::uintptr_t C, std::uintptr_t AT,
                                       int64_t AT_sd, int64_t AT_sn, std::uintptr_t AL, int64_t AL_sd, int64_t AL_sn,
                                       std::uintptr_t D, std::uintptr_t stream) {
  ssm2d::Wave2dProblem p = f.problem;
  p.u = at(f.problem.u, u); p.dT = at(f.problem.dT, dT); p.dL = at(f.problem.dL, dL);
  p.BT = at(f.problem.BT, BT); p.BL = at(f.problem.BL, BL); p.C = at(f.problem.C, C);
  p.AT = reinterpret_cast<const void*>(AT); p.A_sd = AT_sd; p.A_sn = AT_sn;
  p.AL = reinterpret_cast<const void*>(AL); p.AL_sd = AL_sd; p.AL_sn = AL_sn;
  p.D = reinterpret_cast<const void*>(D);
  p.stream = stream;
  return p;
}

// A result given as a data pointer (the frame's layout) or as a grid descriptor of its own.
ssm2d::Grid result(const ssm2d::Grid& layout, py::handle h) {
  return py::isinstance<py::int_>(h) ? at(layout, h.cast<std::uintptr_t>()) : to_grid(h);
}

// Runs the CUDA or the CPU implementation of a problem with the GIL released; an empty batch runs
// nothing.
template <typename Problem, typename Cuda, typename Cpu>
void run_released(const Problem& p, Cuda&& cuda, Cpu&& cpu) {
  if (p.batch == 0) return;
  py::gil_scoped_release nogil;
  if (p.device.is_cuda()) cuda();
  else cpu();
}

}  // namespace

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
  m.def("cuda_pointer_device", [](std::uintptr_t ptr) { return ssm2d::cuda::pointer_device(reinterpret_cast<const void*>(ptr)); });
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

  m.def("scan2d_lanes_fit", &ssm2d::cuda::scan2d_lanes_fit, py::arg("dim"), py::arg("groups"), py::arg("dstate"),
        "Whether the CUDA kernels for this problem are the lanes ones (8 <= N <= 16, groups of a multiple of 8 "
        "channels or one group).");
  m.def("scan2d_chan_fit",
        static_cast<bool (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t)>(&ssm2d::cuda::scan2d_chan_fit),
        py::arg("batch"), py::arg("dim"), py::arg("groups"), py::arg("dstate"), py::arg("height"), py::arg("width"),
        "Whether the CUDA kernels for this problem (scanned grid) are the chan ones: N == 1, a side of at most 16 "
        "cells and the other of at most 64, height >= 2, one group or groups of a multiple of 32 channels, batch * ceil(dim / 32) >= 264.");
  m.def("scan2d_tiled", &ssm2d::cuda::scan2d_tiled, py::arg("dstate"),
        "Whether the CUDA kernels for this many states are the tiled ones (N >= 8) rather than the band ones.");
  m.def("scan2d_backward_needs_y", &ssm2d::cuda::scan2d_backward_needs_y, py::arg("dim"), py::arg("groups"),
        py::arg("dstate"),
        "Whether the CUDA backward needs the pre-gate output saved by the forward (when z is given).");
  m.def("scan2d_forward_workspace_floats", &ssm2d::cuda::scan2d_forward_workspace_floats, py::arg("batch"),
        py::arg("dim"), py::arg("dstate"), py::arg("height"), py::arg("width"), py::arg("saving") = false,
        "float32 scratch of the CUDA forward on the scanned (height, width) grid (saving: carries are "
        "saved for a backward).");
  m.def("scan2d_carry_floats", &ssm2d::cuda::scan2d_carry_floats, py::arg("batch"), py::arg("dim"),
        py::arg("dstate"), py::arg("height"), py::arg("width"),
        "float32 values the CUDA forward saves for the backward, on the scanned (height, width) grid.");
  m.def("scan2d_backward_workspace_floats", &ssm2d::cuda::scan2d_backward_workspace_floats, py::arg("batch"),
        py::arg("dim"), py::arg("dstate"), py::arg("height"), py::arg("width"),
        "float32 scratch of the CUDA backward on the scanned (height, width) grid.");

  m.def("scan2d_forward", [](const py::dict& d, const py::dict& o) {
    const auto p = to_problem(d);
    ssm2d::Scan2dForwardOutputs out;
    out.out = to_grid(o["out"]); out.y = to_grid(o["y"]); out.carries = to_ptr<float>(o["carries"]);
    out.workspace = to_ptr<float>(o["workspace"]);
    run_released(p, [&] { ssm2d::cuda::scan2d_forward(p, out); }, [&] { ssm2d::cpu::scan2d_forward(p, out); });
  });

  m.def("scan2d_backward", [](const py::dict& d, const py::dict& g) {
    const auto p = to_problem(d);
    ssm2d::Scan2dBackwardArgs a;
    a.dout = to_grid(g["dout"]); a.y = to_grid(g["y"]); a.carries = to_ptr<const float>(g["carries"]);
    a.du = to_grid(g["du"]); a.ddelta = to_grid(g["ddelta"]); a.dz = to_grid(g["dz"]);
    a.dB = to_grid(g["dB"]); a.dC = to_grid(g["dC"]);
    a.dA_part = to_ptr(g["dA_part"]); a.dD_part = to_ptr(g["dD_part"]); a.ddelta_bias_part = to_ptr(g["ddelta_bias_part"]);
    a.deterministic = g["deterministic"].cast<bool>();
    a.d_begin = g["d_begin"].cast<int64_t>(); a.d_end = g["d_end"].cast<int64_t>();
    a.workspace = to_ptr<float>(g["workspace"]);
    run_released(p, [&] { ssm2d::cuda::scan2d_backward(p, a); }, [&] { ssm2d::cpu::scan2d_backward(p, a); });
  });

  py::class_<Scan2dFrame>(m, "Scan2dFrame",
                          "A scan2d problem fixed for one argument layout: sizes, dtypes, device and the layouts "
                          "(byte offset, sb, sc, sn, si, sj) of the operands and results; calls add data pointers.")
      .def(py::init(&make_scan2d_frame), py::arg("problem"), py::arg("u"), py::arg("delta"), py::arg("z"),
           py::arg("B"), py::arg("C"), py::arg("cell"), py::arg("ddelta"), py::arg("bc"));

  m.def(
      "scan2d_forward_at",
      [](const Scan2dFrame& f, std::uintptr_t u, std::uintptr_t delta, std::uintptr_t z, std::uintptr_t B,
         std::uintptr_t C, std::uintptr_t A, int64_t A_sd, int64_t A_sn, std::uintptr_t D, std::uintptr_t delta_bias,
         bool softplus, std::uintptr_t stream, std::uintptr_t out, std::uintptr_t y, std::uintptr_t carries,
         std::uintptr_t workspace) {
        const auto p = scan2d_problem_at(f, u, delta, z, B, C, A, A_sd, A_sn, D, delta_bias, softplus, stream);
        ssm2d::Scan2dForwardOutputs o;
        o.out = at(f.cell, out); o.y = at(f.cell, y);
        o.carries = reinterpret_cast<float*>(carries); o.workspace = reinterpret_cast<float*>(workspace);
        run_released(p, [&] { ssm2d::cuda::scan2d_forward(p, o); }, [&] { ssm2d::cpu::scan2d_forward(p, o); });
      },
      "scan2d forward of a frame at data pointers (0: absent); the frame's checks are not repeated.");

  m.def(
      "scan2d_backward_at",
      [](const Scan2dFrame& f, std::uintptr_t u, std::uintptr_t delta, std::uintptr_t z, std::uintptr_t B,
         std::uintptr_t C, std::uintptr_t A, int64_t A_sd, int64_t A_sn, std::uintptr_t D, std::uintptr_t delta_bias,
         bool softplus, std::uintptr_t stream, py::handle dout, std::uintptr_t y, std::uintptr_t carries,
         std::uintptr_t du, std::uintptr_t ddelta, std::uintptr_t dz, std::uintptr_t dB, std::uintptr_t dC,
         py::handle bc, std::uintptr_t dA_part, std::uintptr_t dD_part, std::uintptr_t ddelta_bias_part,
         bool deterministic, int64_t d_begin, int64_t d_end, std::uintptr_t workspace) {
        const auto p = scan2d_problem_at(f, u, delta, z, B, C, A, A_sd, A_sn, D, delta_bias, softplus, stream);
        ssm2d::Scan2dBackwardArgs a;
        // dout: a data pointer when it is contiguous like u (the cell layout), else its grid descriptor.
        a.dout = py::isinstance<py::int_>(dout) ? at(f.cell, dout.cast<std::uintptr_t>()) : to_grid(dout);
        a.y = at(f.cell, y); a.carries = reinterpret_cast<const float*>(carries);
        a.du = at(f.cell, du); a.ddelta = at(f.ddelta, ddelta); a.dz = at(f.cell, dz);
        // bc: None for the frame's accumulator layout, else a layout (per-channel partials).
        const ssm2d::Grid bc_layout = bc.is_none() ? f.bc : to_layout(bc);
        a.dB = at(bc_layout, dB); a.dC = at(bc_layout, dC);
        a.dA_part = reinterpret_cast<void*>(dA_part); a.dD_part = reinterpret_cast<void*>(dD_part);
        a.ddelta_bias_part = reinterpret_cast<void*>(ddelta_bias_part);
        a.deterministic = deterministic; a.d_begin = d_begin; a.d_end = d_end;
        a.workspace = reinterpret_cast<float*>(workspace);
        run_released(p, [&] { ssm2d::cuda::scan2d_backward(p, a); }, [&] { ssm2d::cpu::scan2d_backward(p, a); });
      },
      "scan2d backward of a frame at data pointers (0: absent); the frame's checks are not repeated.");

  m.def("wavefront2d_max_states", &ssm2d::cuda::wavefront2d_max_states, py::arg("width"),
        "States one CUDA wavefront2d call takes (one warp each) for rows of this width.");
  m.def("wavefront2d_workspace_floats", &ssm2d::cuda::wavefront2d_workspace_floats, py::arg("batch"), py::arg("dim"),
        py::arg("dstate"), py::arg("groups"), py::arg("height"), py::arg("width"), py::arg("states_per_block"),
        py::arg("backward"), "float32 scratch of a CUDA wavefront2d call, for the grid as scanned.");

  m.def("wavefront2d_forward", [](const py::dict& d, py::handle out) {
    const auto p = to_wave_problem(d);
    const auto o = to_grid(out);
    run_released(p, [&] { ssm2d::cuda::wavefront2d_forward(p, o); }, [&] { ssm2d::cpu::wavefront2d_forward(p, o); });
  });

  m.def("wavefront2d_backward", [](const py::dict& d, const py::dict& g) {
    const auto p = to_wave_problem(d);
    ssm2d::Wave2dBackwardArgs a;
    a.dout = to_grid(g["dout"]);
    a.du = to_grid(g["du"]); a.ddT = to_grid(g["ddT"]); a.ddL = to_grid(g["ddL"]);
    a.dBT = to_grid(g["dBT"]); a.dBL = to_grid(g["dBL"]); a.dC = to_grid(g["dC"]);
    a.dAT_part = to_ptr(g["dAT_part"]); a.dAL_part = to_ptr(g["dAL_part"]); a.dD_part = to_ptr(g["dD_part"]);
    a.deterministic = g["deterministic"].cast<bool>();
    a.e_begin = g["e_begin"].cast<int64_t>(); a.e_end = g["e_end"].cast<int64_t>();
    a.workspace = to_ptr<float>(g["workspace"]);
    run_released(
        p, [&] { ssm2d::cuda::wavefront2d_backward(p, a); },
        [&] { ssm2d::cpu::wavefront2d_backward(p, a); });
  });

  py::class_<Wave2dFrame>(m, "Wave2dFrame",
                          "A wavefront2d problem fixed for one argument layout (operands in the kernel's slot order); "
                          "calls add data pointers.")
      .def(py::init(&make_wave2d_frame), py::arg("problem"), py::arg("u"), py::arg("dT"), py::arg("dL"),
           py::arg("BT"), py::arg("BL"), py::arg("C"), py::arg("cell"), py::arg("bn"), py::arg("out"));

  m.def(
      "wavefront2d_forward_at",
      [](const Wave2dFrame& f, std::uintptr_t u, std::uintptr_t dT, std::uintptr_t dL, std::uintptr_t BT,
         std::uintptr_t BL, std::uintptr_t C, std::uintptr_t AT, int64_t AT_sd, int64_t AT_sn, std::uintptr_t AL,
         int64_t AL_sd, int64_t AL_sn, std::uintptr_t D, std::uintptr_t stream, std::uintptr_t workspace,
         std::uintptr_t out, bool out_in_dtype) {
        auto p = wave2d_problem_at(f, u, dT, dL, BT, BL, C, AT, AT_sd, AT_sn, AL, AL_sd, AL_sn, D, stream);
        p.workspace = reinterpret_cast<float*>(workspace);
        if (out_in_dtype) {  // the lane kernels write the output in u's dtype (CUDA only)
          if (!p.device.is_cuda())
            throw ssm2d::ArgumentError("wavefront2d_forward_at: out_in_dtype is a CUDA path (the CPU kernel adds into a "
                                       "float32 accumulator)");
          const auto o = at(f.out, out);
          run_released(p, [&] { ssm2d::cuda::wavefront2d_forward_dtype(p, o); }, [] {});
          return;
        }
        const auto o = at(f.cell, out);
        run_released(
            p, [&] { ssm2d::cuda::wavefront2d_forward(p, o); },
            [&] { ssm2d::cpu::wavefront2d_forward(p, o); });
      },
      "wavefront2d forward of a frame at data pointers (0: absent); the frame's checks are not repeated. "
      "out: a float32 accumulator in the frame's cell layout (added into), or with out_in_dtype a tensor "
      "contiguous like u in u's dtype (written; CUDA, where wavefront2d.lanes_fit).");

  m.def(
      "wavefront2d_backward_at",
      [](const Wave2dFrame& f, std::uintptr_t u, std::uintptr_t dT, std::uintptr_t dL, std::uintptr_t BT,
         std::uintptr_t BL, std::uintptr_t C, std::uintptr_t AT, int64_t AT_sd, int64_t AT_sn, std::uintptr_t AL,
         int64_t AL_sd, int64_t AL_sn, std::uintptr_t D, std::uintptr_t stream, std::uintptr_t workspace,
         py::handle dout, std::uintptr_t du, std::uintptr_t ddT, std::uintptr_t ddL, py::handle dBT, py::handle dBL,
         py::handle dC, std::uintptr_t dAT_part, std::uintptr_t dAL_part, std::uintptr_t dD_part, bool deterministic,
         int64_t e_begin, int64_t e_end, bool cells_in_dtype) {
        const auto p = wave2d_problem_at(f, u, dT, dL, BT, BL, C, AT, AT_sd, AT_sn, AL, AL_sd, AL_sn, D, stream);
        if (cells_in_dtype && !p.device.is_cuda())
          throw ssm2d::ArgumentError("wavefront2d_backward_at: cells_in_dtype is a CUDA path (the CPU kernel adds into "
                                     "float32 accumulators)");
        ssm2d::Wave2dBackwardArgs a;
        a.dout = to_grid(dout);
        const ssm2d::Grid& cell = cells_in_dtype ? f.out : f.cell;  // like u in u's dtype, or float32
        a.du = at(cell, du); a.ddT = at(cell, ddT); a.ddL = at(cell, ddL);
        a.cells_in_dtype = cells_in_dtype;
        // dBT, dBL, dC: pointers to the frame's accumulators, or grids of per-channel partials.
        a.dBT = result(f.bn, dBT); a.dBL = result(f.bn, dBL); a.dC = result(f.bn, dC);
        a.dAT_part = reinterpret_cast<void*>(dAT_part); a.dAL_part = reinterpret_cast<void*>(dAL_part);
        a.dD_part = reinterpret_cast<void*>(dD_part);
        a.deterministic = deterministic; a.e_begin = e_begin; a.e_end = e_end;
        a.workspace = reinterpret_cast<float*>(workspace);
        run_released(
            p, [&] { ssm2d::cuda::wavefront2d_backward(p, a); },
            [&] { ssm2d::cpu::wavefront2d_backward(p, a); });
      },
      "wavefront2d backward of a frame at data pointers (0: absent); the frame's checks are not repeated. du, ddT, "
      "ddL: float32 accumulators in the frame's cell layout (added into), or with cells_in_dtype blocks contiguous like "
      "u in u's dtype (written; CUDA, where wavefront2d.lanes_fit).");

  m.def("layer_norm_max_cols", [](int dtype) { return ssm2d::cuda::layer_norm_max_cols(static_cast<ssm2d::DType>(dtype)); },
        py::arg("dtype"), "Longest row the CUDA LayerNorm takes for a dtype code (0 in a build without CUDA).");
  m.def("layer_norm_backward_workspace_floats",
        [](int64_t rows, int64_t cols, int dtype) {
          return ssm2d::cuda::layer_norm_backward_workspace_floats(rows, cols, static_cast<ssm2d::DType>(dtype));
        },
        py::arg("rows"), py::arg("cols"), py::arg("dtype"), "float32 scratch of layer_norm_backward's dweight / dbias.");
  m.def(
      "layer_norm_forward",
      [](std::uintptr_t x, int64_t x_inner, int64_t x_rs, int64_t x_gs, std::uintptr_t y, int64_t y_rs,
         std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t mean, std::uintptr_t rstd, int64_t rows, int64_t cols,
         int dtype, double eps, int device, std::uintptr_t stream) {
        const auto a = layer_norm_args(x, x_inner, x_rs, x_gs, weight, bias, mean, rstd, rows, cols, dtype, eps, device,
                                       stream);
        py::gil_scoped_release nogil;
        ssm2d::cuda::layer_norm_forward(a, reinterpret_cast<void*>(y), y_rs);
      },
      "CUDA LayerNorm over the last dim of (rows, cols) x (row r at (r / x_inner) * x_gs + (r % x_inner) * x_rs "
      "elements, 16-byte aligned) into y (row stride y_rs); float32 "
      "weight / bias (0: absent); mean / rstd (rows float32 each) saved when given.");
  m.def(
      "layer_norm_backward",
      [](std::uintptr_t dy, int64_t dy_rs, std::uintptr_t x, int64_t x_inner, int64_t x_rs, int64_t x_gs,
         std::uintptr_t weight, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dx, int64_t dx_rs,
         std::uintptr_t dweight, std::uintptr_t dbias, std::uintptr_t workspace, int64_t rows, int64_t cols, int dtype,
         int device, std::uintptr_t stream) {
        const auto a = layer_norm_args(x, x_inner, x_rs, x_gs, weight, 0, mean, rstd, rows, cols, dtype, 0.0, device,
                                       stream);
        py::gil_scoped_release nogil;
        ssm2d::cuda::layer_norm_backward(a, reinterpret_cast<const void*>(dy), dy_rs, reinterpret_cast<void*>(dx), dx_rs,
                                         reinterpret_cast<float*>(dweight), reinterpret_cast<float*>(dbias),
                                         reinterpret_cast<float*>(workspace));
      },
      "CUDA LayerNorm backward: dx from dy and the forward's mean / rstd; dweight / dbias (float32, 0: not wanted) "
      "summed in a fixed order through the workspace.");

  m.def(
      "star_relu_forward",
      [](std::uintptr_t x, std::uintptr_t y, int64_t n, std::uintptr_t scale, std::uintptr_t bias, int dtype, int device,
         std::uintptr_t stream) {
        const auto a = star_relu_args(x, n, scale, bias, dtype, device, stream);
        py::gil_scoped_release nogil;
        ssm2d::cuda::star_relu_forward(a, reinterpret_cast<void*>(y));
      },
      "CUDA StarReLU y = scale * relu(x)^2 + bias over n elements of a dense array (16-byte aligned); scale and "
      "bias point at one float32 each.");
  m.def("star_relu_backward_workspace_floats",
        [](int64_t n, int dtype) { return ssm2d::cuda::star_relu_backward_workspace_floats(n, static_cast<ssm2d::DType>(dtype)); },
        py::arg("n"), py::arg("dtype"), "float32 scratch of star_relu_backward's dscale / dbias.");
  m.def(
      "star_relu_backward",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t dx, int64_t n, std::uintptr_t scale, std::uintptr_t dscale,
         std::uintptr_t dbias, std::uintptr_t workspace, int dtype, int device, std::uintptr_t stream) {
        const auto a = star_relu_args(x, n, scale, scale, dtype, device, stream);
        py::gil_scoped_release nogil;
        ssm2d::cuda::star_relu_backward(a, reinterpret_cast<const void*>(dy), reinterpret_cast<void*>(dx),
                                        reinterpret_cast<float*>(dscale), reinterpret_cast<float*>(dbias),
                                        reinterpret_cast<float*>(workspace));
      },
      "CUDA StarReLU backward: dx = dy * 2 scale relu(x); dscale, dbias (one float32 each, 0: not wanted) summed in "
      "a fixed order through the workspace.");

  m.def(
      "dwconv2d_forward",
      [](std::uintptr_t x, std::uintptr_t y, int64_t batch, int64_t channels, int64_t height, int64_t width, int kernel,
         std::uintptr_t weight, std::uintptr_t bias, int dtype, int device, std::uintptr_t stream) {
        const auto a = dwconv2d_args(x, batch, channels, height, width, kernel, weight, bias, dtype, device, stream);
        py::gil_scoped_release nogil;
        ssm2d::cuda::dwconv2d_forward(a, reinterpret_cast<void*>(y));
      },
      "CUDA depthwise convolution y = w (*) x + bias of (batch, C, H, W) contiguous arrays, a k x k kernel per "
      "channel (k = 3, 5, 7), stride 1, zero padding k // 2; weight (C, k, k) and bias (C; 0: none) float32.");
  m.def("dwconv2d_backward_workspace_floats",
        [](int64_t batch, int64_t channels, int64_t height, int64_t width, int kernel) {
          return ssm2d::cuda::dwconv2d_backward_workspace_floats(batch, channels, height, width, kernel, kernel);
        },
        py::arg("batch"), py::arg("channels"), py::arg("height"), py::arg("width"), py::arg("kernel"),
        "float32 scratch of dwconv2d_backward's dweight / dbias.");
  m.def(
      "dwconv2d_backward",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t dx, int64_t batch, int64_t channels, int64_t height,
         int64_t width, int kernel, std::uintptr_t weight, std::uintptr_t dweight, std::uintptr_t dbias,
         std::uintptr_t workspace, int dtype, int device, std::uintptr_t stream) {
        const auto a = dwconv2d_args(x, batch, channels, height, width, kernel, weight, 0, dtype, device, stream);
        py::gil_scoped_release nogil;
        ssm2d::cuda::dwconv2d_backward(a, reinterpret_cast<const void*>(dy), reinterpret_cast<void*>(dx),
                                       reinterpret_cast<float*>(dweight), reinterpret_cast<float*>(dbias),
                                       reinterpret_cast<float*>(workspace));
      },
      "CUDA depthwise convolution backward: dx (0: not wanted); dweight (C, k, k), dbias (C) float32 (0: not "
      "wanted) summed in a fixed order through the workspace.");

  m.def("get_num_threads", &ssm2d::cpu::get_num_threads, "Threads the CPU kernels use.");
  m.def("set_num_threads", &ssm2d::cpu::set_num_threads, py::arg("n"),
        "Threads for the CPU kernels; n <= 0 restores the default (SSM2D_NUM_THREADS or all cores).");
}
