// Registration of the CUDA kernels: the fusedloss ops for the CUDA dispatch key (schemas in
// csrc/ops.cpp), and the CUDA-only helper library `fusedloss_cuda`:
//   raise_pending_error() -> ()  raise the IndexError an earlier kernel recorded, if any
//                                (mailbox.h; synchronise first to be sure every launched kernel
//                                has reported);
//   arch_list() -> str           the CUDA architectures this library was compiled for, as
//                                "sm_80 sm_90 compute_90" (sm_XY: machine code, runs on compute
//                                capability X.Y' with Y' >= Y; compute_XY: PTX, compiled by the
//                                driver for any capability >= X.Y). python/fusedloss/_native.py
//                                uses it to never pick a kernel the current GPU cannot run.
#include <torch/library.h>

#include <string>

#include "cuda/mailbox.h"
#include "cuda/ops.h"

// Set by setup.py from the -gencode flags it compiles with, e.g. sm_80,sm_90,compute_90.
#ifndef FUSEDLOSS_CUDA_ARCHS
#define FUSEDLOSS_CUDA_ARCHS
#endif
#define FUSEDLOSS_STR_(...) #__VA_ARGS__
#define FUSEDLOSS_STR(...) FUSEDLOSS_STR_(__VA_ARGS__)

namespace fusedloss {
namespace cuda {
namespace {

void raise_pending_error() { op_prologue(); }

std::string arch_list() {
  std::string s = FUSEDLOSS_STR(FUSEDLOSS_CUDA_ARCHS);
  for (char& c : s)
    if (c == ',') c = ' ';
  return s;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("softmax_ce_fwd", &softmax_ce_fwd);
  m.impl("softmax_ce_fwd_inplace", &softmax_ce_fwd_inplace);
  m.impl("softmax_ce_bwd", &softmax_ce_bwd);
  m.impl("softmax_decode", &softmax_decode);
  m.impl("sigmoid_bce_fwd", &sigmoid_bce_fwd);
  m.impl("sigmoid_bce_bwd", &sigmoid_bce_bwd);
  m.impl("sigmoid_decode", &sigmoid_decode);
  m.impl("scale_grad_", &scale_grad_);
}

TORCH_LIBRARY(fusedloss_cuda, m) {
  m.def("raise_pending_error() -> ()", &raise_pending_error);
  m.def("arch_list() -> str", &arch_list);
}

}  // namespace cuda
}  // namespace fusedloss
