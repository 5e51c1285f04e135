// The _cuda pybind11 module: sizes and raw-pointer entry points over the CUDA backend.
// Python (rnnfast/cuda.py) owns the arrays, their checks and their allocation; device pointers
// and the stream arrive here as integers, 0 meaning null.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings/noise_input.h"
#include "cublas_shim.h"
#include "rnnfast_cuda.h"

namespace py = pybind11;
using rnnfast::CellKind;
using rnnfast::Dims;
namespace rc = rnnfast::cuda;

namespace {

CellKind cell_kind(const std::string& cell) {
  try {
    return rnnfast::cell_info(cell).kind;
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

rc::DType dtype(const std::string& name) {
  if (name == "float32") return rc::DType::f32;
  if (name == "float64") return rc::DType::f64;
  if (name == "float16") return rc::DType::f16;
  if (name == "bfloat16") return rc::DType::bf16;
  throw py::type_error("the CUDA kernels take float32, float64, float16 or bfloat16, not " + name);
}

// P: the projection's size (0 < P < H, cells with projection), or 0
Dims dims(const std::string& cell, int64_t T, int64_t N, int64_t C, int64_t H, int64_t P = 0) {
  if (T < 0 || N < 1 || C < 1 || H < 1 || P < 0 || (P && P >= H))
    throw py::value_error("bad dims T=" + std::to_string(T) + " N=" + std::to_string(N) +
                          " C=" + std::to_string(C) + " H=" + std::to_string(H) +
                          " P=" + std::to_string(P) + " (need T >= 0, N, C, H >= 1, 0 <= P < H)");
  const Dims d{T, N, C, H, cell_kind(cell), P};
  if (P && !rnnfast::cell_info(d.cell).projection)
    throw py::value_error("a projection is only for LSTM cells, not " + cell);
  if (d.T * d.N > INT32_MAX || d.GH() > INT32_MAX || C > INT32_MAX)
    throw py::value_error("dims too large for 32-bit GEMM sizes: T*N=" + std::to_string(T * N) +
                          ", G*H=" + std::to_string(d.GH()));
  return d;
}

template <typename P>
P ptr(uintptr_t v) {
  return reinterpret_cast<P>(v);
}

void need(uintptr_t v, const char* name) {
  if (!v) throw py::value_error(std::string(name) + " must be a device pointer, got 0");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "rnnfast CUDA kernels (raw-pointer layer; use rnnfast.cuda)";

  m.def(
      "load_cublas", [](const std::string& path) { return rnnfast::cuda::cublas::load(path); },
      py::arg("path") = "",
      "Load libcublas (path or soname; '' for libcublas.so.13). Returns '' or the reason it "
      "failed.");
  m.def("cublas_path", [] { return rnnfast::cuda::cublas::loaded_path(); });
  m.def("runtime_summary", &rc::runtime_summary);

  m.def(
      "reserve_bytes",
      [](const std::string& cell, const std::string& dt, int64_t T, int64_t N, int64_t C, int64_t H,
         int64_t P) { return rc::reserve_bytes(dims(cell, T, N, C, H, P), dtype(dt)); },
      py::arg("cell"), py::arg("dtype"), py::arg("T"), py::arg("N"), py::arg("C"), py::arg("H"),
      py::arg("P") = 0);
  m.def(
      "reserve_layout",
      [](const std::string& cell, int64_t T, int64_t N, int64_t C, int64_t H, int64_t P) {
        const rnnfast::ReserveLayout r = rnnfast::reserve_layout(dims(cell, T, N, C, H, P));
        py::dict out;
        out["hs"] = r.hs;
        out["cs"] = r.cs;
        out["gates"] = r.gates;
        out["ghn"] = r.ghn;
        out["total"] = r.total;
        return out;
      },
      py::arg("cell"), py::arg("T"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("P") = 0,
      "Element offsets of the reserve's parts (hs, cs, gates, ghn) and its total size.");
  m.def(
      "forward_workspace_bytes",
      [](const std::string& cell, const std::string& dt, int64_t T, int64_t N, int64_t C, int64_t H,
         bool training, int64_t P, bool variational) {
        return rc::forward_workspace_bytes(dims(cell, T, N, C, H, P), dtype(dt), training,
                                           training && variational);
      },
      py::arg("cell"), py::arg("dtype"), py::arg("T"), py::arg("N"), py::arg("C"), py::arg("H"),
      py::arg("training"), py::arg("P") = 0, py::arg("variational") = false);
  m.def(
      "backward_workspace_bytes",
      [](const std::string& cell, const std::string& dt, int64_t T, int64_t N, int64_t C, int64_t H,
         int64_t P, bool variational) {
        return rc::backward_workspace_bytes(dims(cell, T, N, C, H, P), dtype(dt), variational);
      },
      py::arg("cell"), py::arg("dtype"), py::arg("T"), py::arg("N"), py::arg("C"), py::arg("H"),
      py::arg("P") = 0, py::arg("variational") = false);
  m.def(
      "persistent_fits",
      [](const std::string& cell, const std::string& dt, int64_t N, int64_t H) {
        return rc::persistent_fits(dims(cell, 1, N, 1, H), dtype(dt));
      },
      py::arg("cell"), py::arg("dtype"), py::arg("N"), py::arg("H"));

  m.def(
      "forward",
      [](const std::string& cell, const std::string& dt, int64_t T, int64_t N, int64_t C, int64_t H,
         uintptr_t x, uintptr_t w_ih, uintptr_t w_hh, uintptr_t b_ih, uintptr_t b_hh, uintptr_t h0,
         uintptr_t c0, uintptr_t lengths, uintptr_t hseq, uintptr_t h_n, uintptr_t c_n,
         uintptr_t reserve, uintptr_t workspace, uintptr_t stream, int device, bool tf32,
         int persistent, uintptr_t w_peephole, int64_t P, uintptr_t w_hr, const py::object& noise) {
        const Dims d = dims(cell, T, N, C, H, P);
        const rnnfast::Noise z = rnnfast::bindings::noise_input(d.cell, noise, d, reserve == 0);
        if (P) need(w_hr, "w_hr");
        if (w_peephole && !rnnfast::cell_info(d.cell).peephole)
          throw py::value_error("w_peephole is only for LSTM cells, not " + cell);
        if (T > 0) need(x, "x");  // an empty x may have no allocation
        need(w_ih, "w_ih");
        need(w_hh, "w_hh");
        need(hseq, "hseq");
        need(h_n, "h_n");
        need(workspace, "workspace");
        if (rnnfast::cell_info(d.cell).has_c) need(c_n, "c_n");
        rc::ForwardArgs a{ptr<const void*>(x),    ptr<const void*>(w_ih),
                          ptr<const void*>(w_hh), ptr<const void*>(b_ih),
                          ptr<const void*>(b_hh), ptr<const void*>(h0),
                          ptr<const void*>(c0),   ptr<const int32_t*>(lengths),
                          ptr<void*>(hseq),       ptr<void*>(h_n),
                          ptr<void*>(c_n),        ptr<void*>(reserve),
                          ptr<void*>(workspace)};
        a.w_peephole = ptr<const void*>(w_peephole);
        a.w_hr = ptr<const void*>(P ? w_hr : 0);
        a.noise = z;
        const rc::Options opt{ptr<void*>(stream), tf32, persistent, device};
        const rc::DType s = dtype(dt);
        py::gil_scoped_release release;
        rc::forward(d, s, a, opt);
      },
      // the pointers by keyword only: a swapped pair of positional integers would be silent
      py::arg("cell"), py::arg("dtype"), py::arg("T"), py::arg("N"), py::arg("C"), py::arg("H"),
      py::kw_only(), py::arg("x"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
      py::arg("b_hh"), py::arg("h0"), py::arg("c0"), py::arg("lengths"), py::arg("hseq"),
      py::arg("h_n"), py::arg("c_n"), py::arg("reserve"), py::arg("workspace"), py::arg("stream"),
      py::arg("device") = -1, py::arg("tf32") = false, py::arg("persistent") = -1,
      py::arg("w_peephole") = 0, py::arg("P") = 0, py::arg("w_hr") = 0,
      py::arg("noise") = py::none());

  m.def(
      "backward",
      [](const std::string& cell, const std::string& dt, int64_t T, int64_t N, int64_t C, int64_t H,
         uintptr_t x, uintptr_t w_ih, uintptr_t w_hh, uintptr_t lengths, uintptr_t reserve,
         uintptr_t hseq, uintptr_t dy, uintptr_t dh_n, uintptr_t dc_n, uintptr_t dx, uintptr_t dh0,
         uintptr_t dc0, uintptr_t dw_ih, uintptr_t dw_hh, uintptr_t db_ih, uintptr_t db_hh,
         uintptr_t workspace, uintptr_t stream, int device, bool tf32, int persistent,
         uintptr_t w_peephole, uintptr_t dw_peephole, int64_t P, uintptr_t w_hr, uintptr_t dw_hr,
         const py::object& noise) {
        const Dims d = dims(cell, T, N, C, H, P);
        const rnnfast::Noise z = rnnfast::bindings::noise_input(d.cell, noise, d, false);
        if (P) {
          need(w_hr, "w_hr");
          need(dw_hr, "dw_hr");
        }
        if (w_peephole && !rnnfast::cell_info(d.cell).peephole)
          throw py::value_error("w_peephole is only for LSTM cells, not " + cell);
        if (bool(w_peephole) != bool(dw_peephole))
          throw py::value_error("w_peephole and dw_peephole go together");
        if (T > 0) need(x, "x");  // an empty x may have no allocation
        need(w_ih, "w_ih");
        need(w_hh, "w_hh");
        need(reserve, "reserve");
        need(hseq, "hseq");
        need(dh0, "dh0");
        need(dw_ih, "dw_ih");
        need(dw_hh, "dw_hh");
        need(workspace, "workspace");
        if (T > 0) need(dx, "dx");
        if (rnnfast::cell_info(d.cell).has_c) need(dc0, "dc0");
        rc::BackwardArgs a{ptr<const void*>(x),       ptr<const void*>(w_ih),
                           ptr<const void*>(w_hh),    ptr<const int32_t*>(lengths),
                           ptr<const void*>(reserve), ptr<const void*>(hseq),
                           ptr<const void*>(dy),      ptr<const void*>(dh_n),
                           ptr<const void*>(dc_n),    ptr<void*>(dx),
                           ptr<void*>(dh0),           ptr<void*>(dc0),
                           ptr<void*>(dw_ih),         ptr<void*>(dw_hh),
                           ptr<void*>(db_ih),         ptr<void*>(db_hh),
                           ptr<void*>(workspace)};
        a.w_peephole = ptr<const void*>(w_peephole);
        a.dw_peephole = ptr<void*>(dw_peephole);
        a.w_hr = ptr<const void*>(P ? w_hr : 0);
        a.dw_hr = ptr<void*>(P ? dw_hr : 0);
        a.noise = z;
        const rc::Options opt{ptr<void*>(stream), tf32, persistent, device};
        const rc::DType s = dtype(dt);
        py::gil_scoped_release release;
        rc::backward(d, s, a, opt);
      },
      py::arg("cell"), py::arg("dtype"), py::arg("T"), py::arg("N"), py::arg("C"), py::arg("H"),
      py::kw_only(), py::arg("x"), py::arg("w_ih"), py::arg("w_hh"), py::arg("lengths"),
      py::arg("reserve"), py::arg("hseq"), py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"),
      py::arg("dx"), py::arg("dh0"), py::arg("dc0"), py::arg("dw_ih"), py::arg("dw_hh"),
      py::arg("db_ih"), py::arg("db_hh"), py::arg("workspace"), py::arg("stream"),
      py::arg("device") = -1, py::arg("tf32") = false, py::arg("persistent") = -1,
      py::arg("w_peephole") = 0, py::arg("dw_peephole") = 0, py::arg("P") = 0, py::arg("w_hr") = 0,
      py::arg("dw_hr") = 0, py::arg("noise") = py::none());

  m.attr("architectures") = RNNFAST_CUDA_ARCHS;
  m.attr("cuda_compiler_version") = RNNFAST_CUDA_COMPILER_VERSION;
  m.attr("cublas_header_checked") = bool(RNNFAST_CUBLAS_HEADER_CHECKED);
}
