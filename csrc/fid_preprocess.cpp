// FID pre-processing op: uint8 images (NCHW or NHWC, any H x W) -> TF1-compatible bilinear
// resize to size x size exactly as torch-fidelity 0.4.0 computes it (resample_manually) ->
// (x - 128) / 128, in one pass and without a float copy of the input. See csrc/README.md.
//
// Built with -ffp-contract=off: every float operation below is rounded on its own, as in
// torch-fidelity's chain of tensor ops, so the CPU result is bit-identical to it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fid_preprocess.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

// For every output index along one axis: the two source taps (indices times `stride`) and
// the fraction d, exactly as torch-fidelity's resample_manually computes them.
struct Taps {
  std::vector<int64_t> lo, hi;
  std::vector<float> d;
};

Taps make_taps(int64_t in_size, int64_t out_size, int64_t stride) {
  const float scale = fid_resize_scale(in_size, out_size);
  Taps t;
  t.lo.resize(out_size);
  t.hi.resize(out_size);
  t.d.resize(out_size);
  for (int64_t i = 0; i < out_size; ++i) {
    const float g = static_cast<float>(i) * scale;
    const int64_t lo = static_cast<int64_t>(g);  // truncation, as Tensor.long()
    const int64_t hi = std::min(lo + 1, in_size - 1);
    t.lo[i] = lo * stride;
    t.hi[i] = hi * stride;
    t.d[i] = g - static_cast<float>(lo);
  }
  return t;
}

// Horizontal pass over one input row (3 channels): buf = v(x_lo) + (v(x_hi) - v(x_lo)) * dx,
// laid out as one output row: [c][ox] (CL = false) or [ox][c] (CL = true). These are exactly
// torch-fidelity's in_0 (row y_lo) and in_1 (row y_hi), so one row serves every output row
// that reads it.
template <bool CL>
void horizontal(const uint8_t* __restrict row, int64_t sc, const Taps& tx, float* __restrict buf,
                int64_t size) {
  const int64_t* __restrict xl = tx.lo.data();
  const int64_t* __restrict xh = tx.hi.data();
  const float* __restrict dx = tx.d.data();
  if (CL) {
    for (int64_t x = 0; x < size; ++x) {
      for (int64_t c = 0; c < 3; ++c) {
        const float v0 = row[c * sc + xl[x]], v1 = row[c * sc + xh[x]];
        buf[x * 3 + c] = v0 + (v1 - v0) * dx[x];
      }
    }
  } else {
    for (int64_t c = 0; c < 3; ++c) {
      const uint8_t* __restrict r = row + c * sc;
      float* __restrict o = buf + c * size;
      for (int64_t x = 0; x < size; ++x) {
        const float v0 = r[xl[x]], v1 = r[xh[x]];
        o[x] = v0 + (v1 - v0) * dx[x];
      }
    }
  }
}

// Vertical pass + normalisation, contiguous (vectorisable): o = (a + (b - a) * dy - 128) / 128.
inline void vertical(const float* __restrict a, const float* __restrict b, float dy,
                     float* __restrict o, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const float v = a[j] + (b[j] - a[j]) * dy;
    o[j] = (v - 128.0f) / 128.0f;
  }
}

// x: logical [n, 3, h, w] view of the input (any strides). out: new, NCHW or NHWC in memory.
template <bool CL>
void preprocess_cpu(const at::Tensor& x, at::Tensor& out, int64_t size) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2);
  const Taps ty = make_taps(h, size, 1);
  const Taps tx = make_taps(w, size, x.stride(3));
  const uint8_t* in = x.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / (3 * size));  // output rows per task
  at::parallel_for(0, n * size, grain, [&](int64_t begin, int64_t end) {
    // Two cached horizontal rows; output rows of one task are consecutive, so y_lo / y_hi
    // mostly hit the cache.
    std::vector<float> storage(6 * size);
    float* bufs[2] = {storage.data(), storage.data() + 3 * size};
    int64_t tag[2] = {-1, -1};  // input row held by each buffer
    int64_t cur_n = -1;
    auto fetch = [&](int64_t y, int64_t keep) -> const float* {
      for (int k = 0; k < 2; ++k) {
        if (tag[k] == y) return bufs[k];
      }
      const int k = tag[0] == keep ? 1 : 0;  // never evict the other row this output row needs
      horizontal<CL>(in + cur_n * sn + y * sh, sc, tx, bufs[k], size);
      tag[k] = y;
      return bufs[k];
    };
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ni = r / size, oy = r % size;
      if (ni != cur_n) {
        cur_n = ni;
        tag[0] = tag[1] = -1;
      }
      const int64_t y0 = ty.lo[oy], y1 = ty.hi[oy];
      const float* a = fetch(y0, y1);
      const float* b = fetch(y1, y0);
      if (CL) {
        vertical(a, b, ty.d[oy], dst + (ni * size + oy) * size * 3, 3 * size);
      } else {
        for (int64_t c = 0; c < 3; ++c) {
          vertical(a + c * size, b + c * size, ty.d[oy], dst + ((ni * 3 + c) * size + oy) * size, size);
        }
      }
    }
  });
}

}  // namespace

// images: uint8 [N, 3, H, W] (channels_last_in = false) or [N, H, W, 3] (true), any strides.
// Returns float32 [N, 3, size, size], NCHW-contiguous or channels_last memory format.
at::Tensor preprocess(const at::Tensor& images, bool channels_last_in, int64_t size,
                      bool channels_last_out) {
  TORCH_CHECK(images.dim() == 4, "fid_preprocess: expected a 4-D uint8 tensor, got shape ",
              images.sizes());
  TORCH_CHECK(images.scalar_type() == at::kByte, "fid_preprocess: expected dtype uint8, got ",
              images.scalar_type(), " (shape ", images.sizes(), ")");
  const int64_t cdim = channels_last_in ? 3 : 1;
  TORCH_CHECK(images.size(cdim) == 3, "fid_preprocess: expected 3 channels in dim ", cdim, " (",
              channels_last_in ? "NHWC" : "NCHW", "), got shape ", images.sizes());
  TORCH_CHECK(size >= 1, "fid_preprocess: size must be >= 1, got ", size);
  // Logical NCHW view: strides carry the layout, so neither NHWC nor a strided view is copied.
  const at::Tensor x = channels_last_in ? images.permute({0, 3, 1, 2}) : images;
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "fid_preprocess: empty image, shape ",
              images.sizes());

  const auto fmt = channels_last_out ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({x.size(0), 3, size, size},
                             images.options().dtype(at::kFloat).memory_format(fmt));
  if (x.size(0) == 0) return out;

  if (x.device().is_cpu()) {
    if (channels_last_out) {
      preprocess_cpu<true>(x, out, size);
    } else {
      preprocess_cpu<false>(x, out, size);
    }
    return out;
  }
#ifdef WITH_CUDA
  if (x.device().is_cuda()) {
    TORCH_CHECK(out.device() == x.device(), "fid_preprocess: output on ", out.device(),
                ", input on ", x.device());
    const c10::cuda::CUDAGuard guard(x.device());
    const char* err = fid_preprocess_cuda_launch(
        x.data_ptr<uint8_t>(), x.size(0), x.size(2), x.size(3), x.stride(0), x.stride(1),
        x.stride(2), x.stride(3), out.data_ptr<float>(), size, channels_last_out ? 1 : 0,
        c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == nullptr, "fid_preprocess: CUDA kernel launch failed: ", err);
    return out;
  }
  TORCH_CHECK(false, "fid_preprocess: unsupported device ", x.device(), " (cpu and cuda only)");
#else
  TORCH_CHECK(false, "fid_preprocess: unsupported device ", x.device(),
              " (this build has no CUDA: cpu only)");
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::module_::import("torch");  // registers the Tensor type caster's Python classes
  m.doc() = "FID pre-processing: uint8 -> TF1 bilinear resize -> (x - 128) / 128, one pass";
  m.def("preprocess", &preprocess, "uint8 images -> float32 [N, 3, size, size] Inception input",
        pybind11::arg("images"), pybind11::arg("channels_last_in"), pybind11::arg("size"),
        pybind11::arg("channels_last_out"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
