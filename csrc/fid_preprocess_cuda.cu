// FID pre-processing op, CUDA side: uint8 images -> TF1 bilinear resize -> (x - 128) / 128.
// CUDA headers only (no torch), so `nvcc -c csrc/fid_preprocess_cuda.cu -o x.o` builds it
// standalone. Every float operation is an explicit round-to-nearest intrinsic, so the result
// does not depend on nvcc's FMA contraction (setup.py passes --fmad=false as well).
#include <cuda_runtime.h>
#include <stdint.h>

#include "fid_preprocess.h"

namespace {

struct Tap {
  int64_t lo, hi;
  float d;
};

// Source coordinate of output index i: g = float(i) * scale; lo = trunc(g);
// hi = min(lo + 1, in - 1); d = g - float(lo). All in float32, as torch-fidelity does.
__device__ __forceinline__ Tap tap(int64_t i, float scale, int64_t in_size) {
  const float g = __fmul_rn(__ll2float_rn(i), scale);
  Tap t;
  t.lo = __float2ll_rz(g);
  t.hi = t.lo + 1 < in_size ? t.lo + 1 : in_size - 1;
  t.d = __fsub_rn(g, __ll2float_rn(t.lo));
  return t;
}

// v0 + (v1 - v0) * d with three separate roundings.
__device__ __forceinline__ float lerp3(float v0, float v1, float d) {
  return __fadd_rn(v0, __fmul_rn(__fsub_rn(v1, v0), d));
}

// One thread per output element, indexed in output memory order (coalesced stores).
__global__ void fid_preprocess_kernel(const uint8_t* __restrict__ in, int64_t h, int64_t w,
                                      int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                                      float* __restrict__ out, int64_t total, int64_t size,
                                      int out_cl, float scale_y, float scale_x) {
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    int64_t n, c, oy, ox, t;
    if (out_cl) {  // [n][oy][ox][c]
      c = idx % 3;
      t = idx / 3;
      ox = t % size;
      t /= size;
      oy = t % size;
      n = t / size;
    } else {  // [n][c][oy][ox]
      ox = idx % size;
      t = idx / size;
      oy = t % size;
      t /= size;
      c = t % 3;
      n = t / 3;
    }
    const Tap ty = tap(oy, scale_y, h);
    const Tap tx = tap(ox, scale_x, w);

    const uint8_t* r0 = in + n * sn + c * sc + ty.lo * sh;
    const uint8_t* r1 = in + n * sn + c * sc + ty.hi * sh;
    const float v00 = (float)r0[tx.lo * sw], v01 = (float)r0[tx.hi * sw];
    const float v10 = (float)r1[tx.lo * sw], v11 = (float)r1[tx.hi * sw];

    const float a = lerp3(v00, v01, tx.d);
    const float b = lerp3(v10, v11, tx.d);
    const float v = lerp3(a, b, ty.d);
    out[idx] = __fdiv_rn(__fsub_rn(v, 128.0f), 128.0f);
  }
}

}  // namespace

const char* fid_preprocess_cuda_launch(const uint8_t* in, int64_t n, int64_t h, int64_t w,
                                       int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                                       float* out, int64_t size, int out_channels_last,
                                       fid_stream_t stream) {
  const int64_t total = n * 3 * size * size;
  if (total == 0) return nullptr;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > (1 << 20)) blocks = 1 << 20;  // the grid-stride loop covers the rest
  fid_preprocess_kernel<<<(unsigned int)blocks, threads, 0, stream>>>(
      in, h, w, sn, sc, sh, sw, out, total, size, out_channels_last,
      fid_resize_scale(h, size), fid_resize_scale(w, size));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
