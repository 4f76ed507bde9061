// FID pre-processing op: the interface shared by fid_preprocess.cpp (torch side) and
// fid_preprocess_cuda.cu (CUDA side). Plain C types only, so that the .cu file compiles
// without any torch header.
#pragma once

#include <stdint.h>

// Same type as cudaStream_t (`typedef struct CUstream_st *cudaStream_t` in the CUDA runtime),
// declared here without including any CUDA header.
struct CUstream_st;
typedef struct CUstream_st* fid_stream_t;

// TF1 resize scale exactly as torch-fidelity computes it: the Python double in / out,
// rounded to float32 by torch.tensor(..., dtype=torch.float32).
static inline float fid_resize_scale(int64_t in_size, int64_t out_size) {
  return (float)((double)in_size / (double)out_size);
}

// Launch the kernel on `stream` (asynchronous). Input: uint8 images on the current device,
// logically [n, 3, h, w] with element (n, c, y, x) at in[n*sn + c*sc + y*sh + x*sw] (any
// strides: NCHW, NHWC or a strided view, no copy needed). Output: a new float32 buffer of
// n * 3 * size * size elements, contiguous NCHW (out_channels_last == 0) or NHWC in memory
// (out_channels_last != 0). Returns NULL on success, else the CUDA error string of the launch.
const char* fid_preprocess_cuda_launch(const uint8_t* in, int64_t n, int64_t h, int64_t w,
                                       int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                                       float* out, int64_t size, int out_channels_last,
                                       fid_stream_t stream);
