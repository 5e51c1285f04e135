// The backend's entry points: sizes of the caller's buffers, and forward/backward by cell kind,
// instantiated here for every row of the cell table and every storage dtype.
#include <string>

#include "cells.cuh"

namespace rnnfast::cuda {

size_t storage_size(DType s) {
  size_t n = 0;
  dispatch_dtype(s, [&](auto tag) { n = sizeof(decltype(tag)); });
  return n;
}

size_t acc_size(DType s) { return s == DType::f64 ? sizeof(double) : sizeof(float); }

size_t reserve_bytes(const Dims& d, DType s) { return reserve_layout(d).total * acc_size(s); }

size_t forward_workspace_bytes(const Dims& d, DType s, bool, bool variational) {
  return forward_workspace(d, acc_size(s), variational).total;
}

size_t backward_workspace_bytes(const Dims& d, DType s, bool variational) {
  return backward_workspace(d, storage_size(s), acc_size(s), variational).total;
}

static void use_device(const Options& opt) {
  if (opt.device >= 0) check_cuda(cudaSetDevice(opt.device), "cudaSetDevice");
}

void forward(const Dims& d, DType s, const ForwardArgs& a, const Options& opt) {
  use_device(opt);
  dispatch_gpu_cell(d.cell, [&](auto kind) {
    dispatch_dtype(
        s, [&](auto tag) { forward_impl<decltype(kind)::value, decltype(tag)>(d, a, opt); });
  });
}

void backward(const Dims& d, DType s, const BackwardArgs& a, const Options& opt) {
  use_device(opt);
  dispatch_gpu_cell(d.cell, [&](auto kind) {
    dispatch_dtype(
        s, [&](auto tag) { backward_impl<decltype(kind)::value, decltype(tag)>(d, a, opt); });
  });
}

bool persistent_fits(const Dims& d, DType s) { return persistent_fits_impl(d, s); }

std::string runtime_summary() {
  int runtime = 0, driver = 0, device = -1;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  std::string out = "runtime " + std::to_string(runtime) + ", driver " + std::to_string(driver);
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess)
      out += ", device " + std::to_string(device) + " " + prop.name + " (sm_" +
             std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
             std::to_string(prop.multiProcessorCount) + " SMs)";
  } else {
    cudaGetLastError();  // no device: clear the sticky-free error and report what we have
  }
  return out;
}

}  // namespace rnnfast::cuda
