// Emulation stand-in: a failed emulated launch raises like a CUDA error.
#pragma once
#include <c10/util/Exception.h>

#include "../../../emu.h"

#define C10_CUDA_CHECK(expr)                                                              \
  do {                                                                                    \
    const cudaError_t emu_error = (expr);                                                 \
    TORCH_CHECK(emu_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(emu_error)); \
  } while (0)
