// Vanilla RNN (tanh or relu) on the GPU: forward and backward through time, every storage dtype.
#include "recurrence.cuh"

namespace rnnfast::cuda {

void rnn_forward(const Dims& d, DType s, const ForwardArgs& a, const Options& opt) {
  dispatch_dtype(s, [&](auto tag) {
    using S = decltype(tag);
    if (d.cell == CellKind::rnn_relu)
      forward_impl<CellKind::rnn_relu, S>(d, a, opt);
    else
      forward_impl<CellKind::rnn_tanh, S>(d, a, opt);
  });
}

void rnn_backward(const Dims& d, DType s, const BackwardArgs& a, const Options& opt) {
  dispatch_dtype(s, [&](auto tag) {
    using S = decltype(tag);
    if (d.cell == CellKind::rnn_relu)
      backward_impl<CellKind::rnn_relu, S>(d, a, opt);
    else
      backward_impl<CellKind::rnn_tanh, S>(d, a, opt);
  });
}

}  // namespace rnnfast::cuda
