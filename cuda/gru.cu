// GRU (gates r, z, n; reset after the recurrent product) on the GPU: forward and backward
// through time, every storage dtype.
#include "recurrence.cuh"

namespace rnnfast::cuda {

void gru_forward(const Dims& d, DType s, const ForwardArgs& a, const Options& opt) {
  dispatch_dtype(s, [&](auto tag) { forward_impl<CellKind::gru, decltype(tag)>(d, a, opt); });
}

void gru_backward(const Dims& d, DType s, const BackwardArgs& a, const Options& opt) {
  dispatch_dtype(s, [&](auto tag) { backward_impl<CellKind::gru, decltype(tag)>(d, a, opt); });
}

}  // namespace rnnfast::cuda
