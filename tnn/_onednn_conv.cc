// oneDNN convolutions as XLA FFI handlers (CPU): NHWC activations, HWIO kernels, float32.
//
// Three handlers, each a custom call of tnn/onednn.py: the forward convolution, its input
// gradient (backward data) and its kernel gradient (backward weights). Attributes: the
// strides (sh, sw) and the padding (plh, phh, plw, phw); every shape comes from the buffers.
// Grouped convolutions (depthwise included): `G = C / w.shape[2]` groups, the kernel
// HWIO `(d_h, d_w, C / G, T)` with output channels group-major, as XLA's
// `feature_group_count`; oneDNN's `hwigo`.
// One primitive per (kind, geometry), created on first use and cached for the process; the
// kernel is reordered from HWIO to the layout oneDNN picked (format_tag::any) on each call,
// by a plain loop over a cached table of offsets (`Offsets`): the kernels are small (at
// most a few thousand floats), and oneDNN's reorder primitive spent ~0.1 ms a call starting
// its thread team, 11 ms of a 122 ms ResNet-32 train step at batch 32 (its verbose log,
// against PyTorch's 1 ms of reorders).
// Thread safety: XLA may run several custom calls at once, so the cache is guarded by a
// mutex and every call brings its own scratchpad (scratchpad_mode::user) and stream;
// oneDNN primitives may execute concurrently given their own memory.
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, plh, phh, plw, phw, g;
  std::string Key(char kind) const {
    std::string k(1, kind);
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, plh, phh, plw, phw, g}) {
      k += ',';
      k += std::to_string(v);
    }
    return k;
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, dt::f32, tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc); }
  memory::dims WDims() const {
    return g == 1 ? memory::dims{o, c, kh, kw} : memory::dims{g, o / g, c / g, kh, kw};
  }
  memory::desc WUser() const {
    return memory::desc(WDims(), dt::f32, g == 1 ? tag::hwio : tag::hwigo);
  }
  memory::desc WAny() const { return memory::desc(WDims(), dt::f32, tag::any); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {plh, plw}; }
  memory::dims PadR() const { return {phh, phw}; }
};

dnnl::convolution_forward::primitive_desc FwdPd(const Geometry& g) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::convolution_direct, g.Src(), g.WAny(),
                                    g.Dst(), g.Strides(), g.PadL(), g.PadR());
  return dnnl::convolution_forward::primitive_desc(d, attr, Engine());
}

struct Entry {
  dnnl::primitive prim;
  memory::desc wdesc;  // the primitive's kernel layout
  memory::desc scratch;
  bool reorder;
  // user (HWIO / hwigo) element k lives at offset[k] of the primitive's layout; empty
  // where that layout is not a blocked one (then `reorder_prim` moves the kernel)
  std::vector<int64_t> offset;
  bool zero_fill;  // the primitive's layout pads: clear it before scattering into it
  dnnl::reorder reorder_prim;  // user <-> primitive kernel layout
};

// Offsets of the kernel's elements in the blocked layout `md` (oneDNN's blocked-layout
// formula: the inner blocks innermost, then the outer strides), in user memory order.
std::vector<int64_t> Offsets(const Geometry& g, const memory::desc& desc) {
  const dnnl_memory_desc_t& md = desc.data;
  if (md.format_kind != dnnl_blocked) return {};
  const dnnl_blocking_desc_t& b = md.format_desc.blocking;
  const int64_t og = g.o / g.g, cg = g.c / g.g;
  std::vector<int64_t> out;
  out.reserve(g.kh * g.kw * cg * g.g * og);
  for (int64_t h = 0; h < g.kh; ++h)
    for (int64_t w = 0; w < g.kw; ++w)
      for (int64_t i = 0; i < cg; ++i)
        for (int64_t gi = 0; gi < g.g; ++gi)
          for (int64_t o = 0; o < og; ++o) {
            int64_t pos[5];
            int nd = 0;
            if (g.g != 1) pos[nd++] = gi;
            pos[nd++] = o;
            pos[nd++] = i;
            pos[nd++] = h;
            pos[nd++] = w;
            int64_t off = md.offset0, blk_stride = 1;
            for (int k = b.inner_nblks - 1; k >= 0; --k) {
              const int d = b.inner_idxs[k];
              off += (pos[d] % b.inner_blks[k]) * blk_stride;
              pos[d] /= b.inner_blks[k];
              blk_stride *= b.inner_blks[k];
            }
            for (int d = 0; d < nd; ++d) off += pos[d] * b.strides[d];
            out.push_back(off);
          }
  return out;
}

std::mutex mu;
std::unordered_map<std::string, std::shared_ptr<Entry>> cache;

std::shared_ptr<Entry> Get(const Geometry& g, char kind) {
  std::string key = g.Key(kind);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto e = std::make_shared<Entry>();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto fwd = FwdPd(g);
  if (kind == 'f') {
    e->prim = dnnl::convolution_forward(fwd);
    e->wdesc = fwd.weights_desc();
    e->scratch = fwd.scratchpad_desc();
  } else if (kind == 'd') {
    dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, g.Src(),
                                            g.WAny(), g.Dst(), g.Strides(), g.PadL(), g.PadR());
    dnnl::convolution_backward_data::primitive_desc pd(d, attr, Engine(), fwd);
    e->prim = dnnl::convolution_backward_data(pd);
    e->wdesc = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, g.Src(),
                                               g.WAny(), g.Dst(), g.Strides(), g.PadL(),
                                               g.PadR());
    dnnl::convolution_backward_weights::primitive_desc pd(d, attr, Engine(), fwd);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->wdesc = pd.diff_weights_desc();
    e->scratch = pd.scratchpad_desc();
  }
  e->reorder = e->wdesc != g.WUser();
  if (e->reorder) {
    e->offset = Offsets(g, e->wdesc);
    e->zero_fill = e->wdesc.get_size() != g.WUser().get_size();
    if (e->offset.empty()) {  // not a blocked layout: oneDNN's reorder moves the kernel
      memory user(g.WUser(), Engine(), nullptr), prim(e->wdesc, Engine(), nullptr);
      e->reorder_prim = kind == 'w' ? dnnl::reorder(prim, user) : dnnl::reorder(user, prim);
    }
  }
  std::lock_guard<std::mutex> lock(mu);
  return cache.emplace(key, e).first->second;
}

Geometry Make(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
              ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t plh, int64_t phh,
              int64_t plw, int64_t phw) {
  return Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1],
                  y[2], sh,   sw,   plh,  phh,  plw,  phw,  x[3] / w[2]};
}

ffi::Error Run(const Geometry& g, char kind, void* src, void* wts, void* dst) {
  try {
    auto e = Get(g, kind);
    dnnl::stream s(Engine());
    // Uninitialised (a vector would zero them on every call).
    std::unique_ptr<uint8_t[]> scratch(new uint8_t[e->scratch.get_size() + 1]);
    std::unique_ptr<uint8_t[]> wbuf(new uint8_t[e->reorder ? e->wdesc.get_size() : 1]);
    memory user_w(g.WUser(), Engine(), wts);
    memory prim_w(e->wdesc, Engine(), e->reorder ? wbuf.get() : wts);
    memory sp(e->scratch, Engine(), scratch.get());
    memory msrc(g.Src(), Engine(), src), mdst(g.Dst(), Engine(), dst);
    const float* uw = static_cast<const float*>(wts);
    float* pw = reinterpret_cast<float*>(wbuf.get());
    auto to_prim = [&] {
      if (!e->reorder) return;
      if (e->offset.empty()) return e->reorder_prim.execute(s, user_w, prim_w);
      if (e->zero_fill) std::memset(pw, 0, e->wdesc.get_size());
      for (size_t k = 0; k < e->offset.size(); ++k) pw[e->offset[k]] = uw[k];
    };
    if (kind == 'f') {
      to_prim();
      e->prim.execute(s, {{DNNL_ARG_SRC, msrc}, {DNNL_ARG_WEIGHTS, prim_w},
                          {DNNL_ARG_DST, mdst}, {DNNL_ARG_SCRATCHPAD, sp}});
    } else if (kind == 'd') {
      to_prim();
      e->prim.execute(s, {{DNNL_ARG_DIFF_SRC, msrc}, {DNNL_ARG_WEIGHTS, prim_w},
                          {DNNL_ARG_DIFF_DST, mdst}, {DNNL_ARG_SCRATCHPAD, sp}});
    } else {
      e->prim.execute(s, {{DNNL_ARG_SRC, msrc}, {DNNL_ARG_DIFF_WEIGHTS, prim_w},
                          {DNNL_ARG_DIFF_DST, mdst}, {DNNL_ARG_SCRATCHPAD, sp}});
      if (e->reorder && e->offset.empty()) {
        e->reorder_prim.execute(s, prim_w, user_w);
      } else if (e->reorder) {
        s.wait();  // the kernel gradient is complete before it is gathered
        float* out = static_cast<float*>(wts);
        for (size_t k = 0; k < e->offset.size(); ++k) out[k] = pw[e->offset[k]];
      }
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("tensorial oneDNN conv: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t plh,
                   int64_t phh, int64_t plw, int64_t phw) {
  auto g = Make(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, plh, phh, plw, phw);
  return Run(g, 'f', x.untyped_data(), w.untyped_data(), y->untyped_data());
}

// dy (N, OH, OW, O), w HWIO -> dx (N, H, W, C)
ffi::Error BwdDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t plh,
                       int64_t phh, int64_t plw, int64_t phw) {
  auto g = Make(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, plh, phh, plw, phw);
  return Run(g, 'd', dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

// x (N, H, W, C), dy (N, OH, OW, O) -> dw HWIO
ffi::Error BwdWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t plh,
                          int64_t phh, int64_t plw, int64_t phw) {
  auto g = Make(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, plh, phh, plw, phw);
  return Run(g, 'w', x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

}  // namespace

#define EXPORT_FFI(fn, ...) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* fn(XLA_FFI_CallFrame*); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(fn, __VA_ARGS__)

#define ATTRS                                                                        \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("plh").Attr<int64_t>("phh") \
      .Attr<int64_t>("plw").Attr<int64_t>("phw")

EXPORT_FFI(TensorialConvFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() ATTRS);
EXPORT_FFI(TensorialConvBwdData, BwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() ATTRS);
EXPORT_FFI(TensorialConvBwdWeights, BwdWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() ATTRS);
