// oneDNN's f32 convolutions (forward, data gradient, weight gradient) as XLA FFI handlers, for
// benchmarks/profiles/onednn_conv.py only: they time what calling oneDNN from JAX would give on a CPU. Not
// part of laga_jax. Layouts are JAX's: activations NHWC, kernels HWIO; square strides, symmetric padding.
#include <cstdint>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

void Execute(const dnnl::primitive& primitive, const std::unordered_map<int, memory>& args) {
  dnnl::stream stream(Engine());
  primitive.execute(stream, args);
  stream.wait();
}

// oneDNN's descriptors of one convolution: x (N, H, W, C), kernel (KH, KW, C, O), y (N, OH, OW, O).
struct Geometry {
  memory::desc src, dst, kernel_any, kernel_hwio;
  memory::dims strides, pad_left, pad_right;
  dnnl::convolution_forward::primitive_desc forward;

  Geometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y, int64_t stride,
           int64_t pad) {
    memory::dims src_dims = {x[0], x[3], x[1], x[2]}, dst_dims = {y[0], y[3], y[1], y[2]};
    memory::dims kernel_dims = {k[3], k[2], k[0], k[1]};
    src = memory::desc(src_dims, memory::data_type::f32, Tag::nhwc);
    dst = memory::desc(dst_dims, memory::data_type::f32, Tag::nhwc);
    // The kernel in whatever layout oneDNN's fastest implementation wants; reordered from / to HWIO.
    kernel_any = memory::desc(kernel_dims, memory::data_type::f32, Tag::any);
    kernel_hwio = memory::desc(kernel_dims, memory::data_type::f32, Tag::hwio);
    strides = {stride, stride};
    pad_left = {pad, pad};
    // The right padding that gives JAX's output size (it can be less than `pad` for strided convolutions).
    pad_right = {(y[1] - 1) * stride + k[0] - x[1] - pad, (y[2] - 1) * stride + k[1] - x[2] - pad};
    forward = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, kernel_any, dst,
        strides, pad_left, pad_right);
  }
};

memory KernelIn(const memory::desc& wanted, const memory::desc& hwio, void* data) {
  memory user(hwio, Engine(), data);
  if (wanted == hwio) return user;
  memory reordered(wanted, Engine());
  Execute(dnnl::reorder(user, reordered), {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, reordered}});
  return reordered;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                   int64_t stride, int64_t pad) {
  Geometry g(x.dimensions(), kernel.dimensions(), y->dimensions(), stride, pad);
  memory src(g.src, Engine(), x.typed_data()), dst(g.dst, Engine(), y->typed_data());
  memory k = KernelIn(g.forward.weights_desc(), g.kernel_hwio, kernel.typed_data());
  Execute(dnnl::convolution_forward(g.forward), {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, k}, {DNNL_ARG_DST, dst}});
  return ffi::Error::Success();
}

ffi::Error DataGradient(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                        int64_t stride, int64_t pad) {
  Geometry g(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride, pad);
  dnnl::convolution_backward_data::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, g.src,
                                                     g.kernel_any, g.dst, g.strides, g.pad_left, g.pad_right,
                                                     g.forward);
  memory diff_src(g.src, Engine(), dx->typed_data()), diff_dst(g.dst, Engine(), dy.typed_data());
  memory k = KernelIn(pd.weights_desc(), g.kernel_hwio, kernel.typed_data());
  Execute(dnnl::convolution_backward_data(pd),
          {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, k}, {DNNL_ARG_DIFF_SRC, diff_src}});
  return ffi::Error::Success();
}

ffi::Error KernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel,
                          int64_t stride, int64_t pad) {
  Geometry g(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride, pad);
  dnnl::convolution_backward_weights::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, g.src,
                                                        g.kernel_any, g.dst, g.strides, g.pad_left, g.pad_right,
                                                        g.forward);
  memory src(g.src, Engine(), x.typed_data()), diff_dst(g.dst, Engine(), dy.typed_data());
  memory user(g.kernel_hwio, Engine(), dkernel->typed_data());
  bool direct = pd.diff_weights_desc() == g.kernel_hwio;
  memory diff_kernel = direct ? user : memory(pd.diff_weights_desc(), Engine());
  Execute(dnnl::convolution_backward_weights(pd),
          {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_kernel}});
  if (!direct) Execute(dnnl::reorder(diff_kernel, user), {{DNNL_ARG_FROM, diff_kernel}, {DNNL_ARG_TO, user}});
  return ffi::Error::Success();
}

}  // namespace

#define CONV_BINDING                                                                                     \
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>() \
      .Attr<int64_t>("stride").Attr<int64_t>("pad")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Forward, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvDataGradient, DataGradient, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvKernelGradient, KernelGradient, CONV_BINDING);
