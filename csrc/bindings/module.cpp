// The pybind11 module rnnfast._C: checks every argument, allocates the outputs and the reserve,
// releases the GIL and dispatches to the CPU kernels. One bind line per cell kind.
#include <cblas.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "bindings/noise_input.h"
#include "cpu/blas.h"
#include "cpu/dense.h"
#include "cpu/kernels.h"
#include "cpu/packed_gemm.h"
#include "cpu/parallel.h"
#include "cpu/scratch.h"
#include "rnnfast/cell.h"
#include "rnnfast/noise.h"

namespace py = pybind11;
using rnnfast::CellKind;
using rnnfast::Dims;
using rnnfast::bindings::noise_input;

namespace {

template <typename T>
struct Kernels {
  void (*forward)(const Dims&, const rnnfast::cpu::ForwardIO<T>&);
  void (*backward)(const Dims&, const rnnfast::cpu::BackwardIO<T>&);
};

// The CPU kernels of a cell kind (a kind the table lacks throws).
template <typename T>
Kernels<T> kernels_for(CellKind cell) {
  Kernels<T> k{};
  rnnfast::dispatch_cell(cell, [&](auto kind) {
    k = {rnnfast::cpu::cell_forward<decltype(kind)::value, T>,
         rnnfast::cpu::cell_backward<decltype(kind)::value, T>};
  });
  return k;
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// The data of `obj` when it is a C-contiguous array of T with exactly `shape`; null for None when
// `optional`. Anything else raises: the kernels never see a wrong dtype, layout or size.
template <typename T>
const T* input(const py::object& obj, const char* name, const std::vector<int64_t>& shape,
               bool optional = false) {
  if (obj.is_none()) {
    if (optional) return nullptr;
    throw py::type_error(std::string(name) + " is required");
  }
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be an ndarray");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " has dtype " + std::string(py::str(a.dtype())) +
                         ", expected " + std::string(py::str(py::dtype::of<T>())));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(std::string(name) + " is not aligned to its dtype (the kernels load " +
                          "whole elements); copy it, for example with numpy.require(a, " +
                          "requirements='CA')");
  bool ok = a.ndim() == py::ssize_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    throw py::value_error(std::string(name) + " must have shape " + want +
                          (shape.size() == 1 ? ",)" : ")") + ", got " + shape_str(a));
  }
  return static_cast<const T*>(a.data());
}

const int32_t* lengths_input(const py::object& obj, int64_t N, int64_t T) {
  const int32_t* len = input<int32_t>(obj, "lengths", {N}, true);
  for (int64_t n = 0; len && n < N; ++n)
    if (len[n] < 0 || len[n] > T)
      throw py::value_error("lengths[" + std::to_string(n) + "] = " + std::to_string(len[n]) +
                            " is outside [0, T = " + std::to_string(T) + "]");
  return len;
}

template <typename T>
T* data(py::array_t<T>& a) {
  return a.mutable_data();
}

// A new C-contiguous array whose memory comes from the kernels' scratch cache and goes back to it
// when NumPy frees the array: reserves, outputs and gradients of the same sizes come round every
// training step, and fresh pages cost the kernel a fault and a zeroing each time.
template <typename T>
py::array_t<T> new_array(std::vector<py::ssize_t> shape) {
  size_t n = 1;
  for (py::ssize_t e : shape) n *= size_t(e);
  void* p = rnnfast::cpu::allocate_scratch(sizeof(T) * std::max<size_t>(n, 1));
  py::capsule owner(p, [](void* q) { rnnfast::cpu::release_scratch(q); });
  return py::array_t<T>(std::move(shape), static_cast<T*>(p), owner);
}

// H from w_hh [G*H, H], or with a projection from w_hr [P, H] (then w_hh is [G*H, P])
Dims dims_of(CellKind cell, const py::array& x, const py::array& w_hh, const py::object& w_hr) {
  if (x.ndim() != 3) throw py::value_error("x must be 3-D (T, N, C), got shape " + shape_str(x));
  if (w_hh.ndim() != 2) throw py::value_error("w_hh must be 2-D, got shape " + shape_str(w_hh));
  Dims d{x.shape(0), x.shape(1), x.shape(2), w_hh.shape(1), cell};
  if (!w_hr.is_none()) {
    if (!rnnfast::cell_info(cell).projection)
      throw py::value_error(std::string("w_hr (a projection) is only for LSTM cells, not ") +
                            rnnfast::cell_info(cell).name);
    if (!py::isinstance<py::array>(w_hr)) throw py::type_error("w_hr must be an ndarray");
    const auto hr = py::reinterpret_borrow<py::array>(w_hr);
    if (hr.ndim() != 2 || hr.shape(0) < 1 || hr.shape(0) >= hr.shape(1))
      throw py::value_error("w_hr must have shape (P, H) with 0 < P < H, got " + shape_str(hr));
    d.P = hr.shape(0);
    d.H = hr.shape(1);
  }
  // every matrix the kernels hand the BLAS must fit its 32-bit sizes
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (d.T * d.N > kMax || d.GH() > kMax || d.C > kMax)
    throw py::value_error("x of shape " + shape_str(x) + " with w_hh of shape " + shape_str(w_hh) +
                          " exceeds the BLAS's 32-bit matrix sizes");
  if (d.N < 1 || d.C < 1 || d.H < 1)
    throw py::value_error("N, C and H must be at least 1; x has shape " + shape_str(x) + ", w_hh " +
                          shape_str(w_hh));
  return d;
}

// w_peephole [3, H], or null; only for a cell whose row takes peepholes
template <typename T>
const T* peephole_input(CellKind cell, const py::object& w_peephole, const Dims& d) {
  const T* p = input<T>(w_peephole, "w_peephole", {3, d.H}, true);
  if (p && !rnnfast::cell_info(cell).peephole)
    throw py::value_error(std::string("w_peephole is only for LSTM cells, not ") +
                          rnnfast::cell_info(cell).name);
  return p;
}

// Layer norm's parameters: None, or (gamma_ih, gamma_hh, gamma_c, beta_c), the last two None for
// a cell without c. Sets d.layer_norm.
template <typename T>
rnnfast::cpu::LayerNormWeights<T> layer_norm_input(CellKind cell, const py::object& obj, Dims& d) {
  rnnfast::cpu::LayerNormWeights<T> ln;
  if (obj.is_none()) return ln;
  const rnnfast::CellInfo& info = rnnfast::cell_info(cell);
  if (!info.layer_norm)
    throw py::value_error(std::string("layer norm is only for the LSTM cells and the GRU with ") +
                          "reset_after=True, not " + info.name);
  if (d.P) throw py::value_error("layer norm is not supported with a projection (w_hr)");
  const auto t = obj.cast<py::tuple>();
  if (t.size() != 4)
    throw py::value_error("ln must be a 4-tuple (gamma_ih, gamma_hh, gamma_c, beta_c)");
  ln.gamma_ih = input<T>(t[0], "ln_gamma_ih", {d.GH()});
  ln.gamma_hh = input<T>(t[1], "ln_gamma_hh", {d.GH()});
  ln.gamma_c = input<T>(t[2], "ln_gamma_c", {d.H}, !info.has_c);
  ln.beta_c = input<T>(t[3], "ln_beta_c", {d.H}, !info.has_c);
  if (!info.has_c && (ln.gamma_c || ln.beta_c))
    throw py::value_error(std::string("ln_gamma_c and ln_beta_c are only for cells with c, not ") +
                          info.name);
  d.layer_norm = true;
  return ln;
}

template <typename T>
py::tuple forward_typed(CellKind cell, const py::array& x, const py::array& w_ih,
                        const py::array& w_hh, const py::object& b_ih, const py::object& b_hh,
                        const py::object& h0, const py::object& c0, const py::object& lengths,
                        bool training, bool bf16, const py::object& w_peephole,
                        const py::object& w_hr, const py::object& noise, const py::object& ln) {
  if (bf16 && !rnnfast::cpu::cpu_has_avx512_bf16())
    throw std::runtime_error("bfloat16 products need a CPU with AVX512_BF16, which this one lacks");
  Dims d = dims_of(cell, x, w_hh, w_hr);
  const int64_t GH = d.GH(), R = d.R(), NR = d.N * R;
  const bool has_c = rnnfast::cell_info(cell).has_c;
  rnnfast::cpu::ForwardIO<T> io{};
  io.x = input<T>(x, "x", {d.T, d.N, d.C});
  io.w_ih = input<T>(w_ih, "w_ih", {GH, d.C});
  io.w_hh = input<T>(w_hh, "w_hh", {GH, R});
  io.w_hr = input<T>(w_hr, "w_hr", {d.P, d.H}, true);
  io.b_ih = input<T>(b_ih, "b_ih", {GH}, true);
  io.b_hh = input<T>(b_hh, "b_hh", {GH}, true);
  io.h0 = input<T>(h0, "h0", {d.N, R}, true);
  io.c0 = input<T>(c0, "c0", {d.N, d.H}, true);
  if (io.c0 && !has_c) throw py::value_error("c0 is only for LSTM");
  io.w_peephole = peephole_input<T>(cell, w_peephole, d);
  io.lengths = lengths_input(lengths, d.N, d.T);
  io.bf16 = bf16;
  io.noise = noise_input(cell, noise, d, !training);
  io.ln = layer_norm_input<T>(cell, ln, d);

  // y is a view of the h sequence, which in training is the start of the reserve
  const int64_t hs_size = (d.T + 1) * NR;
  auto store = new_array<T>({training ? rnnfast::reserve_layout(d).total : hs_size});
  auto h_n = new_array<T>({d.N, R});
  py::object c_n = py::none();
  io.hs = data(store);
  io.reserve = training ? io.hs : nullptr;
  io.h_n = data(h_n);
  if (has_c) {
    auto c = new_array<T>({d.N, d.H});
    io.c_n = data(c);
    c_n = c;
  }
  {
    py::gil_scoped_release release;
    kernels_for<T>(cell).forward(d, io);
  }
  const py::ssize_t s = sizeof(T);
  py::array y(py::dtype::of<T>(), {d.T, d.N, R}, {NR * s, R * s, s}, io.hs + NR, store);
  return py::make_tuple(y, h_n, c_n, training ? py::object(store) : py::none());
}

py::tuple forward(CellKind cell, const py::array& x, const py::array& w_ih, const py::array& w_hh,
                  const py::object& b_ih, const py::object& b_hh, const py::object& h0,
                  const py::object& c0, const py::object& lengths, bool training, bool bf16,
                  const py::object& w_peephole, const py::object& w_hr, const py::object& noise,
                  const py::object& ln) {
  if (x.dtype().is(py::dtype::of<float>()))
    return forward_typed<float>(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, training, bf16,
                                w_peephole, w_hr, noise, ln);
  if (bf16) throw py::type_error("bfloat16 products take float32 inputs, got float64");
  if (x.dtype().is(py::dtype::of<double>()))
    return forward_typed<double>(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, training, false,
                                 w_peephole, w_hr, noise, ln);
  throw py::type_error("x must be float32 or float64, got " + std::string(py::str(x.dtype())));
}

template <typename T>
py::tuple backward_typed(CellKind cell, const py::array& x, const py::array& w_ih,
                         const py::array& w_hh, bool has_b_ih, bool has_b_hh,
                         const py::object& lengths, const py::object& reserve, const py::object& dy,
                         const py::object& dh_n, const py::object& dc_n,
                         const py::object& w_peephole, const py::object& w_hr,
                         const py::object& noise, const py::object& ln, bool bf16) {
  Dims d = dims_of(cell, x, w_hh, w_hr);
  const int64_t GH = d.GH(), R = d.R();
  const bool has_c = rnnfast::cell_info(cell).has_c;
  rnnfast::cpu::BackwardIO<T> io{};
  io.bf16 = bf16;
  io.x = input<T>(x, "x", {d.T, d.N, d.C});
  io.w_ih = input<T>(w_ih, "w_ih", {GH, d.C});
  io.w_hh = input<T>(w_hh, "w_hh", {GH, R});
  io.w_hr = input<T>(w_hr, "w_hr", {d.P, d.H}, true);
  io.lengths = lengths_input(lengths, d.N, d.T);
  io.ln = layer_norm_input<T>(cell, ln, d);
  io.reserve = input<T>(reserve, "reserve", {rnnfast::reserve_layout(d).total});
  io.dy = input<T>(dy, "dy", {d.T, d.N, R}, true);
  io.dh_n = input<T>(dh_n, "dh_n", {d.N, R}, true);
  io.dc_n = input<T>(dc_n, "dc_n", {d.N, d.H}, true);
  if (io.dc_n && !has_c) throw py::value_error("dc_n is only for LSTM");
  io.w_peephole = peephole_input<T>(cell, w_peephole, d);
  io.noise = noise_input(cell, noise, d, false);

  auto dx = new_array<T>({d.T, d.N, d.C}), dh0 = new_array<T>({d.N, R});
  auto dw_ih = new_array<T>({GH, d.C}), dw_hh = new_array<T>({GH, R});
  py::object dc0 = py::none(), db_ih = py::none(), db_hh = py::none(), dw_peephole = py::none(),
             dw_hr = py::none();
  io.dx = data(dx);
  io.dh0 = data(dh0);
  io.dw_ih = data(dw_ih);
  io.dw_hh = data(dw_hh);
  if (has_c) {
    auto a = new_array<T>({d.N, d.H});
    io.dc0 = data(a);
    dc0 = a;
  }
  if (has_b_ih) {
    auto a = new_array<T>({GH});
    io.db_ih = data(a);
    db_ih = a;
  }
  if (has_b_hh) {
    auto a = new_array<T>({GH});
    io.db_hh = data(a);
    db_hh = a;
  }
  if (io.w_peephole) {
    auto a = new_array<T>({3, d.H});
    io.dw_peephole = data(a);
    dw_peephole = a;
  }
  if (io.w_hr) {
    auto a = new_array<T>({d.P, d.H});
    io.dw_hr = data(a);
    dw_hr = a;
  }
  py::object dln = py::none();
  if (d.layer_norm) {
    auto g_ih = new_array<T>({GH}), g_hh = new_array<T>({GH});
    io.dln.gamma_ih = data(g_ih);
    io.dln.gamma_hh = data(g_hh);
    py::object g_c = py::none(), b_c = py::none();
    if (has_c) {
      auto a = new_array<T>({d.H}), b = new_array<T>({d.H});
      io.dln.gamma_c = data(a);
      io.dln.beta_c = data(b);
      g_c = a;
      b_c = b;
    }
    dln = py::make_tuple(g_ih, g_hh, g_c, b_c);
  }
  {
    py::gil_scoped_release release;
    kernels_for<T>(cell).backward(d, io);
  }
  return py::make_tuple(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_peephole, dw_hr, dln);
}

py::tuple backward(CellKind cell, const py::array& x, const py::array& w_ih, const py::array& w_hh,
                   bool has_b_ih, bool has_b_hh, const py::object& lengths,
                   const py::object& reserve, const py::object& dy, const py::object& dh_n,
                   const py::object& dc_n, const py::object& w_peephole, const py::object& w_hr,
                   const py::object& noise, const py::object& ln, bool bf16) {
  if (bf16 && !rnnfast::cpu::cpu_has_avx512_bf16())
    throw std::runtime_error("bfloat16 products need a CPU with AVX512_BF16, which this one lacks");
  if (x.dtype().is(py::dtype::of<float>()))
    return backward_typed<float>(cell, x, w_ih, w_hh, has_b_ih, has_b_hh, lengths, reserve, dy,
                                 dh_n, dc_n, w_peephole, w_hr, noise, ln, bf16);
  if (bf16) throw py::type_error("bfloat16 products take float32 inputs, got float64");
  if (x.dtype().is(py::dtype::of<double>()))
    return backward_typed<double>(cell, x, w_ih, w_hh, has_b_ih, has_b_hh, lengths, reserve, dy,
                                  dh_n, dc_n, w_peephole, w_hr, noise, ln, false);
  throw py::type_error("x must be float32 or float64, got " + std::string(py::str(x.dtype())));
}

// <name>_forward and <name>_backward for one row of the cell table.
void bind_cell(py::module_& m, const rnnfast::CellInfo& info) {
  using namespace py::literals;
  const CellKind cell = info.kind;
  m.def((std::string(info.name) + "_forward").c_str(),
        [cell](const py::array& x, const py::array& w_ih, const py::array& w_hh,
               const py::object& b_ih, const py::object& b_hh, const py::object& h0,
               const py::object& c0, const py::object& lengths, bool training, bool bf16,
               const py::object& w_peephole, const py::object& w_hr, const py::object& noise,
               const py::object& ln) {
          return forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, training, bf16,
                         w_peephole, w_hr, noise, ln);
        },
        "x"_a, "w_ih"_a, "w_hh"_a, "b_ih"_a.none(true), "b_hh"_a.none(true), "h0"_a.none(true),
        "c0"_a.none(true), "lengths"_a.none(true), "training"_a, "bf16"_a = false,
        "w_peephole"_a.none(true) = py::none(), "w_hr"_a.none(true) = py::none(),
        "noise"_a.none(true) = py::none(), "ln"_a.none(true) = py::none(),
        "(y, h_n, c_n or None, reserve or None); see rnnfast.ops");
  m.def((std::string(info.name) + "_backward").c_str(),
        [cell](const py::array& x, const py::array& w_ih, const py::array& w_hh, bool has_b_ih,
               bool has_b_hh, const py::object& lengths, const py::object& reserve,
               const py::object& dy, const py::object& dh_n, const py::object& dc_n,
               const py::object& w_peephole, const py::object& w_hr, const py::object& noise,
               const py::object& ln, bool bf16) {
          return backward(cell, x, w_ih, w_hh, has_b_ih, has_b_hh, lengths, reserve, dy, dh_n, dc_n,
                          w_peephole, w_hr, noise, ln, bf16);
        },
        "x"_a, "w_ih"_a, "w_hh"_a, "has_b_ih"_a, "has_b_hh"_a, "lengths"_a.none(true), "reserve"_a,
        "dy"_a.none(true), "dh_n"_a.none(true), "dc_n"_a.none(true),
        "w_peephole"_a.none(true) = py::none(), "w_hr"_a.none(true) = py::none(),
        "noise"_a.none(true) = py::none(), "ln"_a.none(true) = py::none(), "bf16"_a = false,
        "(dx, dh0, dc0 or None, dw_ih, dw_hh, db_ih or None, db_hh or None, dw_peephole or None, "
        "dw_hr or None, (dln_gamma_ih, dln_gamma_hh, dln_gamma_c, dln_beta_c) or None); see "
        "rnnfast.ops");
}

py::dict build_info() {
  py::dict info;
  info["version"] = RNNFAST_VERSION;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#if defined(RNNFAST_WITH_OPENMP)
  info["openmp"] = true;
  info["openmp_version"] = _OPENMP;
#else
  info["openmp"] = false;
#endif
  info["threads"] = rnnfast::cpu::get_num_threads();
  info["blas"] = RNNFAST_BLAS_NAME;
  info["blas_config"] = std::string(scipy_openblas_get_config());
  info["blas_core"] = std::string(scipy_openblas_get_corename());
  namespace cpu = rnnfast::cpu;
  // compiled for the architecture's baseline; the kernels pick their instruction set at run time
#if defined(__x86_64__)
  info["arch"] = "x86_64";
  __builtin_cpu_init();
  info["cpu_avx512f"] = bool(__builtin_cpu_supports("avx512f"));
#elif defined(__aarch64__)
  info["arch"] = "aarch64";
  info["cpu_avx512f"] = false;
#else
  info["arch"] = "other";
  info["cpu_avx512f"] = false;
#endif
  info["isa"] = cpu::isa_name(cpu::cpu_isa());
  info["simd"] = cpu::cpu_isa() == cpu::Isa::avx512 ? "AVX-512"
                 : cpu::cpu_isa() == cpu::Isa::avx2 ? "AVX2+FMA"
                                                    : "baseline";
  info["cpu_avx512_bf16"] = cpu::cpu_has_avx512_bf16();
  info["cpu_amx_bf16"] = cpu::cpu_has_amx_bf16();
  info["l2_cache_bytes"] = cpu::l2_cache_bytes();  // sizes the AMX product's panel blocks
  info["recurrent_kernel"] =
      !cpu::cpu_has_packed_products() ? "BLAS"
      : !cpu::cpu_has_avx512()        ? "avx2 packed (float32), BLAS (float64)"
      : cpu::cpu_has_amx_bf16() ? "avx512 packed (float32; bfloat16 opt-in on AMX), BLAS (float64)"
      : cpu::cpu_has_avx512_bf16() ? "avx512 packed (float32; bfloat16 opt-in), BLAS (float64)"
                                   : "avx512 packed (float32), BLAS (float64)";
  // when the step's product takes x_t too (StepProduct::stacking_pays): LSTM and RNN cells
  // without layer norm
  info["step_input_stacked"] =
      cpu::cpu_has_packed_products()
          ? "LSTM and RNN steps of N >= " + std::to_string(cpu::packed_tile_rows()) +
                " rows whose G*H x (C + R) weights, packed (4 bytes each, 2 in bfloat16), fit in " +
                std::to_string(cpu::l2_cache_bytes()) + " bytes (one core's L2)"
          : std::string("never (the products go through the BLAS)");
  // when a loop over steps splits the batch between threads rather than the units
  // (cpu::rows_apart_pays)
  info["rows_apart"] =
      cpu::cpu_has_packed_products()
          ? "float32 steps without a projection (nor, backward, layer norm's or peephole "
            "gradients), where every thread's share of the batch fills " +
                std::to_string(cpu::packed_tile_rows()) +
                " rows and the layer's weights (4 bytes each, 2 in bfloat16) take at most " +
                std::to_string(cpu::l2_cache_bytes() / 2) + " bytes (half of one core's L2)"
          : std::string("never (the products go through the BLAS)");
  info["cuda"] = false;
  return info;
}

// A 2-D array of T for the dense helpers: C-contiguous and aligned, as input() demands.
template <typename T>
const T* matrix(const py::array& a, const char* name) {
  if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D, got " + shape_str(a));
  return input<T>(a, name, {a.shape(0), a.shape(1)});
}

bool overlaps(const py::array& a, const py::array& b) {
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// out[M, N] = op(a) op(b), or += with accumulate, on the kernels' OpenMP team
template <typename T>
void gemm_into(const py::array& a, const py::array& b, py::array& out, bool trans_a, bool trans_b,
               bool accumulate, bool bf16) {
  const T* A = matrix<T>(a, "a");
  const T* B = matrix<T>(b, "b");
  const int64_t M = a.shape(trans_a ? 1 : 0), K = a.shape(trans_a ? 0 : 1);
  const int64_t Kb = b.shape(trans_b ? 1 : 0), N = b.shape(trans_b ? 0 : 1);
  if (K != Kb)
    throw py::value_error("op(a) is " + std::to_string(M) + " x " + std::to_string(K) +
                          " but op(b) is " + std::to_string(Kb) + " x " + std::to_string(N) +
                          " (a " + shape_str(a) + ", b " + shape_str(b) + ")");
  T* C = const_cast<T*>(input<T>(out, "out", {M, N}));
  if (!out.writeable()) throw py::value_error("out is read-only");
  if (overlaps(out, a) || overlaps(out, b)) throw py::value_error("out overlaps a or b");
  for (int64_t v : {M, N, K})
    if (v > std::numeric_limits<int32_t>::max())
      throw py::value_error("a matrix dimension exceeds the BLAS's 32-bit range");
  if (bf16 && accumulate) throw py::value_error("bfloat16 products overwrite out: no accumulate");
  py::gil_scoped_release release;
  if constexpr (std::is_same_v<T, float>)
    if (bf16)
      return rnnfast::cpu::parallel_gemm_bf16(rnnfast::cpu::get_num_threads(), trans_a, trans_b, M,
                                              N, K, A, a.shape(1), B, b.shape(1), C, N);
  rnnfast::cpu::parallel_gemm<T>(rnnfast::cpu::get_num_threads(), trans_a, trans_b, M, N, K, A,
                                 a.shape(1), B, b.shape(1), accumulate ? T(1) : T(0), C, N);
}

// The recurrent kernels' step product alone, for tests and bench/tiles.py: c = a w^T
// (+= with accumulate) with w [M, K] packed as a kernel packs it for `rows` rows per call (packed
// float32 where packing pays, the BLAS otherwise; bfloat16 always packed, on AMX where the CPU
// has it), on the calling thread, `repeats` times. Returns (c, the fastest call's seconds).
py::tuple step_product(const py::array& a, const py::array& w, py::array& out, bool bf16,
                       int64_t rows, int repeats, bool accumulate, const py::object& a2_arg,
                       const py::object& w2_arg) {
  const float* A = matrix<float>(a, "a");
  const float* W = matrix<float>(w, "w");
  const int64_t N = a.shape(0), K = a.shape(1), M = w.shape(0);
  if (w.shape(1) != K)
    throw py::value_error("a is " + shape_str(a) + " but w is " + shape_str(w) +
                          ": they must have one number of columns");
  // the stacked operand: a2 [N, K2] times w2 [M, K2] summed into the same outputs
  if (a2_arg.is_none() != w2_arg.is_none())
    throw py::value_error("a2 and w2 come together (the stacked operand), or neither");
  const float *A2 = nullptr, *W2 = nullptr;
  int64_t K2 = 0;
  py::array a2, w2;
  if (!a2_arg.is_none()) {
    a2 = a2_arg.cast<py::array>();
    w2 = w2_arg.cast<py::array>();
    A2 = matrix<float>(a2, "a2");
    W2 = matrix<float>(w2, "w2");
    K2 = a2.shape(1);
    if (a2.shape(0) != N || w2.shape(0) != M || w2.shape(1) != K2)
      throw py::value_error("a2 is " + shape_str(a2) + " and w2 " + shape_str(w2) + ": with a " +
                            shape_str(a) + " and w " + shape_str(w) + " they must be [" +
                            std::to_string(N) + ", K2] and [" + std::to_string(M) + ", K2]");
    if (K2 < 1) throw py::value_error("a2 and w2 must have at least one column");
  }
  if (repeats < 1) throw py::value_error("repeats must be at least 1");
  float* C = const_cast<float*>(input<float>(out, "out", {N, M}));
  if (!out.writeable()) throw py::value_error("out is read-only");
  if (overlaps(out, a) || overlaps(out, w) || (A2 && (overlaps(out, a2) || overlaps(out, w2))))
    throw py::value_error("out overlaps an operand");
  if (bf16 && !rnnfast::cpu::cpu_has_avx512_bf16())
    throw std::runtime_error("bfloat16 products need a CPU with AVX512_BF16, which this one lacks");
  double best = std::numeric_limits<double>::infinity();
  {
    py::gil_scoped_release release;
    const rnnfast::cpu::StepProduct<float> product(W, K, M, K, rnnfast::cpu::WeightsBy::row, {},
                                                   std::max<int64_t>(rows, 1), bf16, {W2, K2, K2});
    const auto add = accumulate ? rnnfast::cpu::Accumulate::yes : rnnfast::cpu::Accumulate::no;
    for (int r = 0; r < repeats; ++r) {
      const auto start = std::chrono::steady_clock::now();
      if (A2)
        product(N, A, K, A2, K2, C, M, add);
      else
        product(N, A, K, C, M, add);
      best = std::min(
          best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  return py::make_tuple(out, best);
}

template <typename T>
py::tuple softmax_cross_entropy(const py::array& logits, const py::object& targets,
                                const py::object& kept, const py::object& scale) {
  const T* x = matrix<T>(logits, "logits");
  const int64_t R = logits.shape(0), V = logits.shape(1);
  const int64_t* t = input<int64_t>(targets, "targets", {R});
  const uint8_t* k = input<uint8_t>(kept, "kept", {R});
  const double* sc = input<double>(scale, "scale", {R});
  for (int64_t r = 0; r < R; ++r)
    if (k[r] && (t[r] < 0 || t[r] >= V))
      throw py::value_error("targets[" + std::to_string(r) + "] = " + std::to_string(t[r]) +
                            " is outside [0, " + std::to_string(V) + ")");
  auto grad = new_array<T>({R, V});
  py::array_t<double> losses(R);
  T* g = grad.mutable_data();
  double* l = losses.mutable_data();
  {
    py::gil_scoped_release release;
    rnnfast::cpu::softmax_cross_entropy<T>(rnnfast::cpu::get_num_threads(), R, V, x, t, k, sc, g,
                                           l);
  }
  return py::make_tuple(grad, losses);
}

// grad[ids[r]] += rows[r] (dense.h): ids int64 [R], rows [R, D], grad [V, D] of rows' dtype
template <typename T>
void embedding_backward(const py::object& ids, const py::array& rows, py::array& grad,
                        int64_t skip) {
  const T* g = matrix<T>(grad, "grad");
  const int64_t V = grad.shape(0), D = grad.shape(1);
  if (!grad.writeable()) throw py::value_error("grad is read-only");
  const T* x = matrix<T>(rows, "rows");
  const int64_t R = rows.shape(0);
  if (rows.shape(1) != D)
    throw py::value_error("rows have " + std::to_string(rows.shape(1)) + " columns, grad " +
                          std::to_string(D));
  const int64_t* id = input<int64_t>(ids, "ids", {R});
  for (int64_t r = 0; r < R; ++r)
    if (id[r] < 0 || id[r] >= V)
      throw py::value_error("ids[" + std::to_string(r) + "] = " + std::to_string(id[r]) +
                            " is outside [0, " + std::to_string(V) + ")");
  if (overlaps(rows, grad)) throw py::value_error("rows shares memory with grad");
  py::gil_scoped_release release;
  rnnfast::cpu::embedding_backward<T>(rnnfast::cpu::get_num_threads(), R, D, id, x, skip,
                                      const_cast<T*>(g));
}

// One parameter's Adam update in place (dense.h); every array C-contiguous, of p's dtype and
// shape, and none sharing memory with another
template <typename T>
void adam_step(py::array& p, const py::array& g, py::array& m, py::array& v,
               const py::object& max_v, const rnnfast::cpu::AdamStep<T>& h) {
  std::vector<int64_t> shape(p.shape(), p.shape() + p.ndim());
  T* P = const_cast<T*>(input<T>(p, "param", shape));
  const T* G = input<T>(g, "grad", shape);
  T* M = const_cast<T*>(input<T>(m, "exp_avg", shape));
  T* V = const_cast<T*>(input<T>(v, "exp_avg_sq", shape));
  T* X = const_cast<T*>(input<T>(max_v, "max_exp_avg_sq", shape, true));
  std::vector<std::pair<const char*, py::array>> all = {
      {"param", p}, {"grad", g}, {"exp_avg", m}, {"exp_avg_sq", v}};
  if (X) all.emplace_back("max_exp_avg_sq", py::reinterpret_borrow<py::array>(max_v));
  for (size_t i = 0; i < all.size(); ++i) {
    if (i != 1 && !all[i].second.writeable())
      throw py::value_error(std::string(all[i].first) + " is read-only");
    for (size_t j = 0; j < i; ++j)
      if (overlaps(all[i].second, all[j].second))
        throw py::value_error(std::string(all[i].first) + " shares memory with " + all[j].first);
  }
  py::gil_scoped_release release;
  rnnfast::cpu::adam_update<T>(rnnfast::cpu::get_num_threads(), int64_t(p.size()), h, P, G, M, V,
                               X);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using namespace py::literals;
  m.doc() = "rnnfast CPU kernels (private; use rnnfast.ops)";
  m.attr("__version__") = RNNFAST_VERSION;
  for (const rnnfast::CellInfo& info : rnnfast::kCellTable) bind_cell(m, info);
  m.def(
      "cell_table",
      [] {
        py::list rows;
        for (const rnnfast::CellInfo& c : rnnfast::kCellTable) {
          py::dict row;
          row["name"] = c.name;
          row["gates"] = c.gates;
          row["has_c"] = c.has_c;
          row["saves_gates"] = c.saves_gates;
          row["reset_after"] = c.reset_after;
          row["reset_before"] = c.reset_before;
          row["peephole"] = c.peephole;
          row["layer_norm"] = c.layer_norm;
          row["projection"] = c.projection;
          row["gpu"] = c.gpu;
          rows.append(row);
        }
        return rows;
      },
      "The C++ cell table (csrc/rnnfast/cell.h), row by row; rnnfast/cells.py must agree.");
  m.def(
      "recurrent_masks",
      [](uint32_t purpose, uint64_t seed, uint32_t stream, uint32_t threshold, int64_t T, int64_t N,
         int64_t H) {
        if (purpose < 1 || purpose > 3) throw py::value_error("purpose must be 1, 2 or 3");
        if (T < 0 || N < 0 || H < 0) throw py::value_error("T, N and H must be >= 0");
        py::array_t<bool> out({T, N, H});
        bool* o = out.mutable_data();
        for (int64_t t = 0; t < T; ++t)
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < H; ++j)
              *o++ = rnnfast::noise_keeps(seed, stream, rnnfast::NoisePurpose(purpose), threshold,
                                          t, n, j);
        return out;
      },
      "purpose"_a, "seed"_a, "stream"_a, "threshold"_a, "T"_a, "N"_a, "H"_a,
      "keep[T, N, H] of one mask purpose (csrc/rnnfast/noise.h); see rnnfast.ops.recurrent_masks");
  m.def(
      "gemm",
      [](const py::array& a, const py::array& b, py::array& out, bool trans_a, bool trans_b,
         bool accumulate, bool bf16) {
        if (bf16 && !rnnfast::cpu::cpu_has_avx512_bf16())
          throw std::runtime_error(
              "bfloat16 products need a CPU with AVX512_BF16, which this one lacks");
        if (a.dtype().is(py::dtype::of<float>()))
          gemm_into<float>(a, b, out, trans_a, trans_b, accumulate, bf16);
        else if (bf16)
          throw py::type_error("bfloat16 products take float32 inputs, got float64");
        else if (a.dtype().is(py::dtype::of<double>()))
          gemm_into<double>(a, b, out, trans_a, trans_b, accumulate, false);
        else
          throw py::type_error("a must be float32 or float64, got " +
                               std::string(py::str(a.dtype())));
      },
      "a"_a, "b"_a, "out"_a, "trans_a"_a = false, "trans_b"_a = false, "accumulate"_a = false,
      "bf16"_a = false,
      "out[M, N] = op(a) op(b) (+= with accumulate) on the kernels' threads; see rnnfast.ops.gemm");
  m.def(
      "register_peak_flops",
      [](const std::string& kind, int64_t iterations) {
        if (iterations < 1) throw py::value_error("iterations must be at least 1");
        py::gil_scoped_release release;
        return rnnfast::cpu::register_peak_flops(kind.c_str(), iterations);
      },
      "kind"_a, "iterations"_a = 2000000,
      "FLOP/s of one core's register-only multiply-add loop (bench/tiles.py)");
  m.def("step_product", &step_product, "a"_a, "w"_a, "out"_a, "bf16"_a = false, "rows"_a = 0,
        "repeats"_a = 1, "accumulate"_a = false, "a2"_a = py::none(), "w2"_a = py::none(),
        "(out, seconds): out[N, M] = a w^T (+ a2 w2^T, stacked) through the step product's "
        "kernels (tests, bench)");
  m.def(
      "softmax_cross_entropy",
      [](const py::array& logits, const py::object& targets, const py::object& kept,
         const py::object& scale) {
        if (logits.dtype().is(py::dtype::of<float>()))
          return softmax_cross_entropy<float>(logits, targets, kept, scale);
        if (logits.dtype().is(py::dtype::of<double>()))
          return softmax_cross_entropy<double>(logits, targets, kept, scale);
        throw py::type_error("logits must be float32 or float64, got " +
                             std::string(py::str(logits.dtype())));
      },
      "logits"_a, "targets"_a, "kept"_a, "scale"_a,
      "(grad[R, V], losses[R]) of rows of logits against targets; see rnnfast.losses");
  m.def(
      "empty",
      [](const py::tuple& dims, const py::dtype& dtype) {
        std::vector<py::ssize_t> shape;
        size_t n = 1;
        for (const py::handle& d : dims) {
          const py::ssize_t e = d.cast<py::ssize_t>();
          if (e < 0) throw py::value_error("empty: negative dimension " + std::to_string(e));
          shape.push_back(e);
          n *= size_t(e);
        }
        void* p = rnnfast::cpu::allocate_scratch(size_t(dtype.itemsize()) * std::max<size_t>(n, 1));
        py::capsule owner(p, [](void* q) { rnnfast::cpu::release_scratch(q); });
        return py::array(dtype, std::move(shape), p, owner);
      },
      "shape"_a, "dtype"_a,
      "an uninitialised C-contiguous array from the kernels' scratch cache (as the kernels' own "
      "outputs), returned to it when freed");
  m.def(
      "embedding_backward",
      [](const py::object& ids, const py::array& rows, py::array& grad, int64_t skip) {
        if (grad.dtype().is(py::dtype::of<float>()))
          return embedding_backward<float>(ids, rows, grad, skip);
        if (grad.dtype().is(py::dtype::of<double>()))
          return embedding_backward<double>(ids, rows, grad, skip);
        throw py::type_error("grad must be float32 or float64, got " +
                             std::string(py::str(grad.dtype())));
      },
      "ids"_a, "rows"_a, "grad"_a, "skip"_a = -1,
      "grad[ids[r]] += rows[r] in r order, rows whose id is skip left out; see rnnfast.Embedding");
  m.def(
      "adam_step",
      [](py::array& p, const py::array& g, py::array& m, py::array& v, const py::object& max_v,
         double keep, double weight_decay, double one_minus_beta1, double beta2,
         double one_minus_beta2, double bias2_sqrt, double step_size, double eps, bool maximize) {
        auto run = [&](auto zero) {
          using T = decltype(zero);
          const rnnfast::cpu::AdamStep<T> h{T(keep),
                                            T(weight_decay),
                                            T(one_minus_beta1),
                                            T(beta2),
                                            T(one_minus_beta2),
                                            T(bias2_sqrt),
                                            T(step_size),
                                            T(eps),
                                            maximize};
          adam_step<T>(p, g, m, v, max_v, h);
        };
        if (p.dtype().is(py::dtype::of<float>()))
          run(0.0f);
        else if (p.dtype().is(py::dtype::of<double>()))
          run(0.0);
        else
          throw py::type_error("param must be float32 or float64, got " +
                               std::string(py::str(p.dtype())));
      },
      "param"_a, "grad"_a, "exp_avg"_a, "exp_avg_sq"_a, "max_exp_avg_sq"_a, "keep"_a,
      "weight_decay"_a, "one_minus_beta1"_a, "beta2"_a, "one_minus_beta2"_a, "bias2_sqrt"_a,
      "step_size"_a, "eps"_a, "maximize"_a,
      "Adam's update of one parameter in place; see rnnfast.optim.Adam");
  m.def("build_info", &build_info);
  m.def("set_num_threads", &rnnfast::cpu::set_num_threads);
  m.def("get_num_threads", &rnnfast::cpu::get_num_threads);
  m.def("set_scratch_cache_limit", &rnnfast::cpu::set_scratch_cache_limit, py::arg("bytes"));
  m.def("scratch_cache_limit", &rnnfast::cpu::scratch_cache_limit);
  m.def("scratch_cache_bytes", &rnnfast::cpu::scratch_cache_bytes);
}
