// The dense pieces around the recurrent kernels, for the Python layers: the output head's fused
// softmax cross-entropy, the embedding's gradient and the Adam update. (Their products go through
// parallel_gemm, blas.h.) NumPy would run them in many passes on one core; here each is one pass on
// the kernels' team.
#pragma once

#include <cstdint>

namespace rnnfast::cpu {

// Row r of logits [R, V] against class targets[r]: losses[r] = logsumexp(row) - row[target]
// and grad[r] = scale[r] * (softmax(row) - onehot(target)). A row with kept[r] == 0 is never
// read (NaN there is harmless): its loss and gradient are zero. Each row is one thread's work,
// so the bits do not depend on the thread count.
template <typename T>
void softmax_cross_entropy(int threads, int64_t R, int64_t V,
                           const T* logits,         // [R, V]
                           const int64_t* targets,  // [R], each in [0, V) where kept
                           const uint8_t* kept,     // [R]
                           const double* scale,     // [R]
                           T* grad,                 // [R, V], out
                           double* losses);         // [R], out

// An embedding's gradient: grad[ids[r]] += rows[r] for r = 0 .. R-1 in that order, skipping
// rows whose id is `skip` (the padding row; -1 for none). Every id in [0, V) (the caller checks).
// The threads split the D columns, so each element is one sum in r order whatever the team.
template <typename T>
void embedding_backward(int threads, int64_t R, int64_t D,
                        const int64_t* ids,  // [R]
                        const T* rows,       // [R, D]
                        int64_t skip,
                        T* grad);  // [V, D], added into

// Adam's update of one parameter, in place, as rnnfast.optim.Adam's NumPy form (torch.optim.Adam's
// order of operations) computes it: with the scalars below rounded to T from the float64 values
// the Python side computes, the bits are the same (dense.cpp is built without fused multiply-add
// contraction). max_v is null without AMSGrad. Elementwise, so the bits do not depend on the
// thread count.
template <typename T>
struct AdamStep {
  T keep;          // 1 - lr * weight_decay with decoupled (AdamW) decay, else 1
  T weight_decay;  // L2 added to the gradient (Adam), else 0
  T one_minus_beta1, beta2, one_minus_beta2;
  T bias2_sqrt;  // sqrt(1 - beta2^step)
  T step_size;   // lr / (1 - beta1^step)
  T eps;
  bool maximize;
};
template <typename T>
void adam_update(int threads, int64_t n, const AdamStep<T>& h,
                 T* p,        // [n], updated
                 const T* g,  // [n]
                 T* m,        // [n], updated
                 T* v,        // [n], updated
                 T* max_v);   // [n] or null, updated

}  // namespace rnnfast::cpu
