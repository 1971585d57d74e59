// oneDNN's direct convolutions (forward, input gradient, filter gradient) as XLA:CPU FFI
// handlers: bigjax/kernels/onednn.py builds this file and registers the three targets;
// bigjax/models/conv_onednn.py calls them (`model.conv_impl: onednn`).
//
// Layouts: activations NHWC (jax's), filters HWIO; oneDNN picks its own blocked filter layout
// (`tag::any`, one reorder per call, small next to the convolution) while activations stay in
// place. Primitives are created once per geometry and cached (creation JITs code, ~ms); the
// cache is shared by XLA's threads under a mutex, and each call brings its own scratchpad, so
// concurrent calls of one primitive never share memory.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Kind : int64_t { kFwd, kBwdData, kBwdWeights };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Geometry of one convolution: N, H, W, C (input), KH, KW, O, OH, OW, strides, paddings.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, plh, phh, plw, phw;
  memory::data_type dt;
  std::vector<int64_t> key(Kind kind) const {
    return {kind, n, h, w, c, kh, kw, o, oh, ow, sh, sw, plh, phh, plw, phw,
            static_cast<int64_t>(dt)};
  }
  memory::desc src() const { return {{n, c, h, w}, dt, memory::format_tag::nhwc}; }
  memory::desc dst() const { return {{n, o, oh, ow}, dt, memory::format_tag::nhwc}; }
  memory::desc weights_any() const { return {{o, c, kh, kw}, dt, memory::format_tag::any}; }
  memory::desc weights_hwio() const { return {{o, c, kh, kw}, dt, memory::format_tag::hwio}; }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          g.src(), g.weights_any(), g.dst(), {g.sh, g.sw}, {g.plh, g.plw}, {g.phh, g.phw},
          UserScratchpad()};
}

// One cached convolution: the primitive, its scratchpad size and the filter layout it wants.
struct Entry {
  dnnl::primitive conv;
  memory::desc weights;  // the primitive's filter (or filter-gradient) layout
  memory::desc scratchpad;
  bool reorder;          // weights differ from HWIO
};

std::shared_ptr<Entry> MakeEntry(const Geometry& g, Kind kind) {
  auto entry = std::make_shared<Entry>();
  auto fwd = ForwardDesc(g);
  if (kind == kFwd) {
    entry->conv = dnnl::convolution_forward(fwd);
    entry->weights = fwd.weights_desc();
    entry->scratchpad = fwd.scratchpad_desc();
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.src(), g.weights_any(), g.dst(),
        {g.sh, g.sw}, {g.plh, g.plw}, {g.phh, g.phw}, fwd, UserScratchpad());
    entry->conv = dnnl::convolution_backward_data(pd);
    entry->weights = pd.weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.src(), g.weights_any(), g.dst(),
        {g.sh, g.sw}, {g.plh, g.plw}, {g.phh, g.phw}, fwd, UserScratchpad());
    entry->conv = dnnl::convolution_backward_weights(pd);
    entry->weights = pd.diff_weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
  }
  entry->reorder = entry->weights != g.weights_hwio();
  return entry;
}

std::shared_ptr<Entry> Cached(const Geometry& g, Kind kind) {
  static std::mutex mu;
  static std::map<std::vector<int64_t>, std::shared_ptr<Entry>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[g.key(kind)];
  if (!slot) slot = MakeEntry(g, kind);
  return slot;
}

ffi::Error Run(Kind kind, const Geometry& g, void* src, void* weights, void* dst) {
  try {
    auto entry = Cached(g, kind);
    dnnl::stream stream(Engine());
    memory src_m(g.src(), Engine(), src), dst_m(g.dst(), Engine(), dst);
    memory hwio(g.weights_hwio(), Engine(), weights);
    memory w_m = entry->reorder ? memory(entry->weights, Engine()) : hwio;
    if (entry->reorder && kind != kBwdWeights) dnnl::reorder(hwio, w_m).execute(stream, hwio, w_m);
    std::vector<char> pad_bytes(entry->scratchpad.get_size());
    memory pad(entry->scratchpad, Engine(), pad_bytes.data());
    if (kind == kFwd) {
      entry->conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, w_m},
                                   {DNNL_ARG_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, pad}});
    } else if (kind == kBwdData) {
      entry->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, w_m},
                                   {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, pad}});
    } else {
      entry->conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, w_m},
                                   {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, pad}});
      if (entry->reorder) dnnl::reorder(w_m, hwio).execute(stream, w_m, hwio);
    }
    stream.wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
}

// x: N H W C, w: KH KW C O, y: N OH OW O (the output's shape comes from jax).
ffi::Error Shapes(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer y, int64_t sh, int64_t sw,
                  int64_t plh, int64_t phh, int64_t plw, int64_t phw, Geometry* g) {
  memory::data_type dt;
  if (x.element_type() == ffi::DataType::F32) {
    dt = memory::data_type::f32;
  } else if (x.element_type() == ffi::DataType::BF16) {
    dt = memory::data_type::bf16;
  } else {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: float32 or bfloat16");
  }
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: rank-4 operands");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
                sh, sw, plh, phh, plw, phw, dt};
  return ffi::Error::Success();
}

#define BIGJAX_CONV_ATTRS                                                          \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("plh").Attr<int64_t>("phh") \
      .Attr<int64_t>("plw").Attr<int64_t>("phw")

ffi::Error ConvFwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, int64_t sh,
                   int64_t sw, int64_t plh, int64_t phh, int64_t plw, int64_t phw) {
  Geometry g;
  if (auto e = Shapes(x, w, *y, sh, sw, plh, phh, plw, phw, &g); e.failure()) return e;
  return Run(kFwd, g, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error ConvBwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                       int64_t sh, int64_t sw, int64_t plh, int64_t phh, int64_t plw,
                       int64_t phw) {
  Geometry g;
  if (auto e = Shapes(*dx, w, dy, sh, sw, plh, phh, plw, phw, &g); e.failure()) return e;
  return Run(kBwdData, g, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error ConvBwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                          int64_t sh, int64_t sw, int64_t plh, int64_t phh, int64_t plw,
                          int64_t phw) {
  Geometry g;
  if (auto e = Shapes(x, *dw, dy, sh, sw, plh, phh, plw, phw, &g); e.failure()) return e;
  return Run(kBwdWeights, g, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(bigjax_conv_fwd, ConvFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() BIGJAX_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(bigjax_conv_bwd_data, ConvBwdData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() BIGJAX_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(bigjax_conv_bwd_weights, ConvBwdWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() BIGJAX_CONV_ATTRS);
