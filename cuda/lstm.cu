// LSTM (gates i, f, g, o) on the GPU: forward and backward through time, every storage dtype.
#include "recurrence.cuh"

namespace rnnfast::cuda {

void lstm_forward(const Dims& d, DType s, const ForwardArgs& a, const Options& opt) {
  dispatch_dtype(s, [&](auto tag) { forward_impl<CellKind::lstm, decltype(tag)>(d, a, opt); });
}

void lstm_backward(const Dims& d, DType s, const BackwardArgs& a, const Options& opt) {
  dispatch_dtype(s, [&](auto tag) { backward_impl<CellKind::lstm, decltype(tag)>(d, a, opt); });
}

}  // namespace rnnfast::cuda
