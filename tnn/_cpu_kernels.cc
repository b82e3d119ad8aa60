// tensorial's CPU kernels as XLA FFI handlers: oneDNN convolutions (NHWC activations,
// HWIO kernels, float32) and BatchNorm's per-channel reductions (at the end).
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
// Threads: a batch is cut into slices run single-threaded on XLA's own CPU thread pool
// (`Run`), a small one runs on oneDNN's OpenMP threads. XLA may run several custom calls
// at once, so the cache is guarded by a mutex and every execution brings its own
// scratchpad (scratchpad_mode::user, the executing thread's `ThreadBuffer`) and stream
// (the thread's); oneDNN primitives may execute concurrently given their own memory.
// Primitives are cached per thread mode, oneDNN fixing its thread count when it creates one.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

#if defined(__x86_64__)
#define TNN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TNN_CLONES
#endif

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// This thread's oneDNN stream, made once.
dnnl::stream& ThreadStream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

// A buffer of this thread's, grown as needed and kept for the next call (64-byte aligned,
// contents unspecified). Why no malloc on the way to a primitive (this, `ThreadStream`,
// `ThreadMems`): under `decomp.reuse_host_memory` (M_ARENA_MAX 1) every thread's malloc
// takes the one heap's lock, and the slices of a convolution allocating their scratchpads,
// kernel copies and memory objects at once met on it, a futex wait and wake per call (perf:
// 21% of a chain of tiny convolutions in lll_lock wait/wake). Measured on the 2-core
// AVX-512 VM: a 1x1 conv of 2 images of 8x8x8 28.3 -> 3.8 us a call, of 32 of 8x8x64
// 98 -> 61 us; ResNet-32 train step at batch 32 (two alternating processes each) dense
// 77.5/80.7 -> 68.1/68.8 ms, TR 80.8/83.8 -> 65.4/66.4 ms. (Separate arenas per thread
// instead were slower: XLA's step buffers then faulted in 20k pages a step.)
// One per use (`slot`): a thread uses all of them at once at most in one call (the caller's
// slice-gradient sums in `Run` beside its own slice's scratchpad and kernel copy).
enum Slot { kScratch, kKernel, kPartial, kSlots };

void* ThreadBuffer(Slot slot, size_t bytes) {
  struct Buffers {
    void* p[kSlots] = {};
    size_t size[kSlots] = {};
    ~Buffers() {
      for (void* q : p) std::free(q);
    }
  };
  thread_local Buffers b;
  if (bytes > b.size[slot]) {
    const size_t size = (bytes + 63) / 64 * 64;
    void* q = std::aligned_alloc(64, size);
    if (!q) throw std::bad_alloc();
    std::free(b.p[slot]);
    b.p[slot] = q;
    b.size[slot] = size;
  }
  return b.p[slot];
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, plh, phh, plw, phw, g;
  std::string Key(char kind, bool seq) const {
    std::string k(1, kind);
    k += seq ? 's' : 'p';
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

// This thread's memory objects for the primitive `e` (source, kernel, destination,
// scratchpad), made once without a buffer and pointed at each call's buffers: making them
// per call was four mallocs on each slice (see `ThreadBuffer`). `e` is never freed (the
// primitive cache keeps it), so its address is the key.
struct Mems {
  memory src, w, dst, sp;
};

Mems& ThreadMems(const Entry& e, const Geometry& g) {
  thread_local std::unordered_map<const Entry*, Mems> mems;
  auto it = mems.find(&e);
  if (it == mems.end()) {
    Mems m{memory(g.Src(), Engine(), nullptr), memory(e.wdesc, Engine(), nullptr),
           memory(g.Dst(), Engine(), nullptr), memory(e.scratch, Engine(), nullptr)};
    it = mems.emplace(&e, std::move(m)).first;
  }
  return it->second;
}

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

std::shared_ptr<Entry> Get(const Geometry& g, char kind, bool seq) {
  std::string key = g.Key(kind, seq);
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

// Sets the calling thread's OpenMP thread count for a scope.
class OmpThreads {
 public:
  explicit OmpThreads(int n) : prev_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~OmpThreads() { omp_set_num_threads(prev_); }

 private:
  int prev_;
};

// The kernel `uw` (HWIO / hwigo) in the primitive's layout: `uw` itself, or a copy in this
// thread's kernel buffer.
float* KernelIn(const Entry& e, const Geometry& g, float* uw) {
  if (!e.reorder) return uw;
  float* buf = static_cast<float*>(ThreadBuffer(kKernel, e.wdesc.get_size()));
  if (e.offset.empty()) {
    dnnl::stream& s = ThreadStream();
    memory user(g.WUser(), Engine(), uw), prim(e.wdesc, Engine(), buf);
    e.reorder_prim.execute(s, user, prim);
    s.wait();
  } else {
    if (e.zero_fill) std::memset(buf, 0, e.wdesc.get_size());
    for (size_t k = 0; k < e.offset.size(); ++k) buf[e.offset[k]] = uw[k];
  }
  return buf;
}

// The kernel gradient `pw` (the primitive's layout) written to `uw` in the user's layout.
void KernelOut(const Entry& e, const Geometry& g, float* pw, float* uw) {
  if (!e.reorder) {
    if (pw != uw) std::memcpy(uw, pw, g.WUser().get_size());
  } else if (e.offset.empty()) {
    dnnl::stream& s = ThreadStream();
    memory user(g.WUser(), Engine(), uw), prim(e.wdesc, Engine(), pw);
    e.reorder_prim.execute(s, prim, user);
    s.wait();
  } else {
    for (size_t k = 0; k < e.offset.size(); ++k) uw[k] = pw[e.offset[k]];
  }
}

// One convolution of kind `kind` on the activations `src` / `dst` (a whole batch or a
// slice of one, described by `g`); `uw` is the user-layout kernel ('f', 'd') or receives
// the kernel gradient ('w'). `seq`: oneDNN single-threaded on the calling thread, else
// with its OpenMP threads. `e`: the primitive (looked up by the caller, so that slices
// running at once do not meet on the cache's mutex).
void Conv(const std::shared_ptr<Entry>& e, const Geometry& g, char kind, bool seq, float* src,
          float* uw, float* dst) {
  std::optional<OmpThreads> one;
  if (seq) one.emplace(1);
  float* pw = kind == 'w' ? uw : KernelIn(*e, g, uw);
  if (kind == 'w' && e->reorder) {
    pw = static_cast<float*>(ThreadBuffer(kKernel, e->wdesc.get_size()));
  }
  dnnl::stream& s = ThreadStream();
  Mems& m = ThreadMems(*e, g);
  m.src.set_data_handle(src, s);
  m.w.set_data_handle(pw, s);
  m.dst.set_data_handle(dst, s);
  m.sp.set_data_handle(ThreadBuffer(kScratch, e->scratch.get_size() + 1), s);
  const dnnl_exec_arg_t args[] = {
      {kind == 'd' ? DNNL_ARG_DIFF_SRC : DNNL_ARG_SRC, m.src.get()},
      {kind == 'w' ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS, m.w.get()},
      {kind == 'f' ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST, m.dst.get()},
      {DNNL_ARG_SCRATCHPAD, m.sp.get()}};
  dnnl::error::wrap_c_api(dnnl_primitive_execute(e->prim.get(), s.get(), 4, args),
                          "could not execute a convolution");
  s.wait();
  if (kind == 'w') KernelOut(*e, g, pw, uw);
}

// Slices 0..parts-1 of a job, claimed one at a time by whichever thread asks first: the
// caller and the helpers it scheduled on XLA's pool. The caller never waits on a slice
// nobody has started (it claims those itself), so a busy or absent pool cannot deadlock
// it; a helper that arrives after every slice is claimed returns at once, touching only
// this object (kept alive by its shared_ptr, `body` not called).
struct Slices {
  static constexpr std::chrono::microseconds kSpin{1000};
  explicit Slices(int64_t n) : parts(n) {}
  const int64_t parts;
  std::function<void(int64_t)> body;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;
  std::string error;  // the first slice's failure, guarded by mu

  void Work() {
    for (int64_t p; (p = next.fetch_add(1)) < parts;) {
      try {
        body(p);
      } catch (const std::exception& err) {
        std::lock_guard<std::mutex> lock(mu);
        if (error.empty()) error = err.what();
      }
      if (done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
  // Spins up to kSpin before sleeping: a slice on another thread is usually done within
  // microseconds of the caller's, and sleeping on the condition variable then waking cost
  // ~25 us a call (a 1x1 conv of 4 channels at batch 32: 58 us a call blocking at once,
  // 30 spinning; ResNet-32 train step, batch 32: dense 73.6 -> 69.0 ms, TR 93.6 -> 81.6).
  void Wait() {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1; done.load(std::memory_order_acquire) != parts; ++i) {
      CpuRelax();
      if (i % 64 == 0 && std::chrono::steady_clock::now() > until) break;
    }
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return done.load() == parts; });
  }
};

// The first of `n` items in slice p of `parts` (sizes n / parts, the first n % parts one more).
int64_t SliceStart(int64_t n, int64_t parts, int64_t p) {
  return p * (n / parts) + std::min(p, n % parts);
}

// Runs body(0) .. body(parts - 1) on the caller and XLA's pool; rethrows the first failure.
void ParallelSlices(ffi::ThreadPool& pool, int64_t parts,
                    const std::function<void(int64_t)>& body) {
  auto job = std::make_shared<Slices>(parts);
  job->body = body;
  for (int64_t p = 1; p < parts; ++p) pool.Schedule([job] { job->Work(); });
  job->Work();
  job->Wait();
  if (!job->error.empty()) throw std::runtime_error(job->error);
}

// Threading. A batch of at least as many images as XLA's CPU thread pool has threads is
// cut into that many slices (sizes differing by at most one), each run by oneDNN
// single-threaded on one of XLA's own threads; the kernel gradient is the sum of the
// slices' in slice order. Smaller batches (and a pool of one thread) run as one oneDNN
// call on its OpenMP threads. Why: Debian's oneDNN threads with OpenMP, a second pool
// beside XLA's. Handing the cores from one pool to the other cost ~0.25 ms at each
// XLA<->oneDNN switch (a chain of ten 3x3 convs at batch 32 ran 0.51 ms a conv, 0.90
// with a ReLU between each), which was half the oneDNN time inside a ResNet-32 train
// step. On XLA's threads the convolutions and XLA's own fusions share one pool.
ffi::Error Run(ffi::ThreadPool& pool, const Geometry& g, char kind, void* src, void* wts,
               void* dst) {
  try {
    const int64_t threads = pool.num_threads();
    float* fsrc = static_cast<float*>(src);
    float* fdst = static_cast<float*>(dst);
    float* uw = static_cast<float*>(wts);
    if (threads < 2 || g.n < threads) {
      Conv(Get(g, kind, /*seq=*/false), g, kind, /*seq=*/false, fsrc, uw, fdst);
      return ffi::Error::Success();
    }
    const int64_t parts = threads;
    // the slices' primitives (batch n / parts, and one more where it does not divide),
    // created single-threaded
    Geometry small = g, large = g;
    small.n = g.n / parts;
    large.n = small.n + 1;
    std::shared_ptr<Entry> e_small, e_large;
    {
      OmpThreads one(1);
      e_small = Get(small, kind, true);
      if (g.n % parts) e_large = Get(large, kind, true);
    }
    const size_t wsize = g.WUser().get_size() / sizeof(float);
    // the slices' kernel gradients, slice 0's in `wts` itself
    float* partial = kind == 'w' ? static_cast<float*>(ThreadBuffer(
                                       kPartial, (parts - 1) * wsize * sizeof(float)))
                                 : nullptr;
    ParallelSlices(pool, parts, [&](int64_t p) {
      const bool big = p < g.n % parts;
      const int64_t first = SliceStart(g.n, parts, p);
      float* w = kind == 'w' && p > 0 ? partial + (p - 1) * wsize : uw;
      Conv(big ? e_large : e_small, big ? large : small, kind, /*seq=*/true,
           fsrc + first * g.h * g.w * g.c, w, fdst + first * g.oh * g.ow * g.o);
    });
    if (kind == 'w') {
      for (int64_t p = 1; p < parts; ++p) {
        const float* o = partial + (p - 1) * wsize;
        for (size_t k = 0; k < wsize; ++k) uw[k] += o[k];
      }
    }
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("tensorial oneDNN conv: ") + err.what());
  }
  return ffi::Error::Success();
}

// --- BatchNorm's reductions (tnn/norm.py) ------------------------------------------
//
// Per-channel sums over every axis but the last of channels-last float32 arrays, in one
// pass: (x - k) and (x - k)^2 for a shift k (the forward's statistics), dy and
// dy * (x - mean) (the backward's). The rows are cut into slices on XLA's threads as the
// convolutions are; within a slice, blocks of kBlock rows are summed in float (vectorized
// over the channels) and the blocks' sums added in double; the slices' in slice order.

constexpr int64_t kBlock = 32;
constexpr int64_t kMinRowsPerSlice = 512;

// s1[j] += sum_i a(i, j), s2[j] += sum_i a(i, j) * b(i, j) over rows [r0, r1), where
// a = x - k and b = a (`square`), or a = dy and b = x - k.
TNN_CLONES void BlockSums(
    const float* __restrict x, const float* __restrict dy, const float* __restrict k,
    int64_t r0, int64_t r1, int64_t c, double* __restrict s1, double* __restrict s2) {
  float* __restrict b1 = static_cast<float*>(ThreadBuffer(kScratch, 2 * c * sizeof(float)));
  float* __restrict b2 = b1 + c;
  for (int64_t r = r0; r < r1; r += kBlock) {
    std::fill(b1, b1 + 2 * c, 0.0f);
    const int64_t e = std::min(r1, r + kBlock);
    if (dy == nullptr) {
      for (int64_t i = r; i < e; ++i) {
        const float* __restrict row = x + i * c;
        for (int64_t j = 0; j < c; ++j) {
          const float d = row[j] - k[j];
          b1[j] += d;
          b2[j] += d * d;
        }
      }
    } else {
      for (int64_t i = r; i < e; ++i) {
        const float* __restrict row = x + i * c;
        const float* __restrict g = dy + i * c;
        for (int64_t j = 0; j < c; ++j) {
          b1[j] += g[j];
          b2[j] += g[j] * (row[j] - k[j]);
        }
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      s1[j] += b1[j];
      s2[j] += b2[j];
    }
  }
}

ffi::Error Sums(ffi::ThreadPool& pool, const float* x, const float* dy, const float* k,
                int64_t rows, int64_t c, float* o1, float* o2) {
  try {
    const int64_t threads = pool.num_threads();
    const int64_t parts =
        std::max<int64_t>(1, std::min<int64_t>(threads, rows / kMinRowsPerSlice));
    double* acc = static_cast<double*>(ThreadBuffer(kPartial, 2 * c * parts * sizeof(double)));
    std::fill(acc, acc + 2 * c * parts, 0.0);
    ParallelSlices(pool, parts, [&](int64_t p) {
      double* a = acc + 2 * c * p;
      BlockSums(x, dy, k, SliceStart(rows, parts, p), SliceStart(rows, parts, p + 1), c, a,
                a + c);
    });
    for (int64_t j = 0; j < c; ++j) {
      double t1 = 0.0, t2 = 0.0;
      for (int64_t p = 0; p < parts; ++p) {
        t1 += acc[2 * c * p + j];
        t2 += acc[2 * c * p + c + j];
      }
      o1[j] = static_cast<float>(t1);
      o2[j] = static_cast<float>(t2);
    }
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("tensorial BatchNorm sums: ") + err.what());
  }
  return ffi::Error::Success();
}

// x (..., C), k (C) -> sum (x - k), sum (x - k)^2 over every axis but the last
ffi::Error BnSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                      ffi::ResultBuffer<ffi::F32> s1, ffi::ResultBuffer<ffi::F32> s2) {
  const int64_t c = k.element_count();
  return Sums(pool, x.typed_data(), nullptr, k.typed_data(), x.element_count() / c, c,
              s1->typed_data(), s2->typed_data());
}

// dy (..., C), x (..., C), mean (C) -> sum dy, sum dy * (x - mean)
ffi::Error BnGradSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                          ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                          ffi::ResultBuffer<ffi::F32> s1, ffi::ResultBuffer<ffi::F32> s2) {
  const int64_t c = mean.element_count();
  return Sums(pool, x.typed_data(), dy.typed_data(), mean.typed_data(), x.element_count() / c,
              c, s1->typed_data(), s2->typed_data());
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t plh,
                   int64_t phh, int64_t plw, int64_t phw) {
  auto g = Make(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, plh, phh, plw, phw);
  return Run(pool, g, 'f', x.untyped_data(), w.untyped_data(), y->untyped_data());
}

// dy (N, OH, OW, O), w HWIO -> dx (N, H, W, C)
ffi::Error BwdDataImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t plh,
                       int64_t phh, int64_t plw, int64_t phw) {
  auto g = Make(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, plh, phh, plw, phw);
  return Run(pool, g, 'd', dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

// x (N, H, W, C), dy (N, OH, OW, O) -> dw HWIO
ffi::Error BwdWeightsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t plh,
                          int64_t phh, int64_t plw, int64_t phw) {
  auto g = Make(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, plh, phh, plw, phw);
  return Run(pool, g, 'w', x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

}  // namespace

#define EXPORT_FFI(fn, ...) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* fn(XLA_FFI_CallFrame*); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(fn, __VA_ARGS__)

#define ATTRS                                                                        \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("plh").Attr<int64_t>("phh") \
      .Attr<int64_t>("plw").Attr<int64_t>("phw")

// the three conv handlers' signature: (x or dy, w or dy) -> one buffer, the six attributes
#define CONV_BINDING                                                                    \
  ffi::Ffi::Bind()                                                                      \
      .Ctx<ffi::ThreadPool>()                                                           \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Ret<ffi::Buffer<ffi::F32>>() ATTRS

EXPORT_FFI(TensorialConvFwd, FwdImpl, CONV_BINDING);
EXPORT_FFI(TensorialConvBwdData, BwdDataImpl, CONV_BINDING);
EXPORT_FFI(TensorialConvBwdWeights, BwdWeightsImpl, CONV_BINDING);

EXPORT_FFI(TensorialBnSums, BnSumsImpl,
           ffi::Ffi::Bind()
               .Ctx<ffi::ThreadPool>()
               .Arg<ffi::Buffer<ffi::F32>>()
               .Arg<ffi::Buffer<ffi::F32>>()
               .Ret<ffi::Buffer<ffi::F32>>()
               .Ret<ffi::Buffer<ffi::F32>>());
EXPORT_FFI(TensorialBnGradSums, BnGradSumsImpl,
           ffi::Ffi::Bind()
               .Ctx<ffi::ThreadPool>()
               .Arg<ffi::Buffer<ffi::F32>>()
               .Arg<ffi::Buffer<ffi::F32>>()
               .Arg<ffi::Buffer<ffi::F32>>()
               .Ret<ffi::Buffer<ffi::F32>>()
               .Ret<ffi::Buffer<ffi::F32>>());
