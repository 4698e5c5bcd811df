// The OpenMP API subset fastalign's CPU kernels call, for the portable build
// (csrc/portable/omp_runtime.cpp implements it). Other builds use the compiler's
// own omp.h and OpenMP runtime.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

int omp_get_thread_num(void);
int omp_get_num_threads(void);
int omp_get_max_threads(void);
void omp_set_num_threads(int n);

#ifdef __cplusplus
}
#endif
