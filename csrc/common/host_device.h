// FASTALIGN_HD marks the small math functions of csrc/common/ that the C++ CPU kernels and the
// CUDA kernels both call, so each formula is written once: inline on the host, __host__
// __device__ and force-inlined under nvcc.
#pragma once

#ifdef __CUDACC__
#define FASTALIGN_HD __host__ __device__ __forceinline__
#else
#define FASTALIGN_HD inline
#endif
