// A CPU stand-in for the CUDA names moekern's kernels (csrc/**/*.cu) use, so their real source runs on a
// machine without a GPU (tools/simt/build.py compiles it; tests/test_simt_kernels.py checks it against the torch
// references). Included by common/portability.cuh when MOEKERN_SIMT_EMULATION is defined.
//
// Why. The GPU is the scarce resource: a kernel change that breaks ids or counts should fail in CI on a CPU, not
// after minutes of device time. The emulator runs each block's threads as fibers (ucontext) on one OS thread,
// switching at every barrier: __syncthreads is a block barrier, and every warp primitive (shuffles, ballot,
// match, redux) is an exchange through a per-warp buffer between two warp barriers. So the kernels' lane
// arithmetic, team reductions, shared-memory histograms, scans and scatters run as written. The blocks of a grid
// run in waves of kSms, each block on its own OS thread (as resident blocks run side by side on a GPU), so a grid
// barrier between resident blocks works; atomics are real atomics.
//
// `__shared__` storage starts filled with 0xA5 in every block (GPU shared memory starts as garbage).
//
// What it does not model: timing, memory ordering and races within a block (its threads switch only at barriers;
// the GPU's racecheck/memcheck stay the judges of those), occupancy (max_active_blocks is 1, num_sms 4, so the
// multi-block paths run with small grids), PTX (griddepcontrol and other inline asm stay behind __CUDA_ARCH__). A thread
// that returns leaves its warp's and block's barriers (as an exited GPU thread does); a barrier no thread can
// complete (threads diverged at __syncthreads or a full-warp shuffle) stops the launch with an error, and a spin past
// the launch's 60 s deadline stops the process.
#pragma once

#include <dlfcn.h>
#include <link.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one block per OS thread: its thread's statics are its shared memory

// ---------------------------------------------------------------- runtime types
using cudaStream_t = void*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {  // CUDA's alignment: a misaligned vector load is caught (-fsanitize=alignment)
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};

namespace mk_simt {

#if defined(MOEKERN_SIMT_WAVE64)
constexpr int kWarp = 64;  // the HIP build's wavefront (CDNA): portability.cuh takes its MOEKERN_HIP branch
using mask_t = unsigned long long;
#else
constexpr int kWarp = 32;
using mask_t = unsigned;
#endif
constexpr int kSms = 4;  // small: grid-stride loops and multi-block histograms take several turns

inline unsigned f2u(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline float u2f(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

struct Barrier {
  int expected = 0, arrived = 0;
  std::vector<int> waiters;
};

struct Warp {
  Barrier bar;
  unsigned buf[kWarp];
  bool alive[kWarp];  // lanes that exist and have not returned: ballots, matches and reductions see these
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  int tid = 0;
  bool ready = true, done = false;
};

struct Block {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier bar;
  ucontext_t scheduler;
  int current = -1;
  std::function<void()> body;
  std::string error;
};

inline Block*& block_now() {
  static thread_local Block* b = nullptr;
  return b;
}
inline std::string& last_error_text() {  // written after a launch's block threads have joined
  static std::string s;
  return s;
}

inline void yield_to_scheduler() {
  Block* b = block_now();
  swapcontext(&b->fibers[b->current].ctx, &b->scheduler);
}

inline void release(Barrier& bar) {
  Block* b = block_now();
  bar.arrived = 0;
  for (int w : bar.waiters) b->fibers[w].ready = true;
  bar.waiters.clear();
}

inline void arrive_and_wait(Barrier& bar) {
  Block* b = block_now();
  if (++bar.arrived >= bar.expected) {
    release(bar);
    return;
  }
  bar.waiters.push_back(b->current);
  b->fibers[b->current].ready = false;
  yield_to_scheduler();
}

inline void drop(Barrier& bar) {  // an exited thread no longer counts
  --bar.expected;
  if (bar.arrived > 0 && bar.arrived >= bar.expected) release(bar);
}

inline int tid_now() { return block_now()->fibers[block_now()->current].tid; }
inline Warp& warp_now() { return block_now()->warps[tid_now() / kWarp]; }
inline int lane_now() { return tid_now() % kWarp; }

// Every lane offers v; returns the offers after all lanes of the warp have made theirs.
inline const unsigned* exchange(unsigned v) {
  Warp& w = warp_now();
  w.buf[lane_now()] = v;
  arrive_and_wait(w.bar);
  return w.buf;
}
inline void exchange_done() { arrive_and_wait(warp_now().bar); }

inline void fiber_entry() {
  Block* b = block_now();
  b->body();
  Fiber& f = b->fibers[b->current];
  f.done = true;
  b->warps[f.tid / kWarp].alive[f.tid % kWarp] = false;
  drop(b->warps[f.tid / kWarp].bar);
  drop(b->bar);
  // returning resumes uc_link: the scheduler
}

// Runs one block's threads as fibers on this OS thread; throws on a barrier deadlock.
constexpr size_t kStack = 128 * 1024;

// GPU shared memory starts as garbage, not zeros: every block starts with this module's thread-local storage (the
// `__shared__` arrays, and block_now, set after) filled with 0xA5, so a kernel that reads shared memory it never
// wrote fails here too.
inline void poison_shared_memory() {
  Block** volatile anchor = &block_now();  // allocates this module's TLS block in the calling thread
  (void)anchor;
  Dl_info di;
  if (!dladdr(reinterpret_cast<void*>(&poison_shared_memory), &di)) return;
  struct Base {
    void* base;
  } base{di.dli_fbase};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* d) -> int {
        if (reinterpret_cast<void*>(info->dlpi_addr) != static_cast<Base*>(d)->base || info->dlpi_tls_data == nullptr)
          return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i)
          if (info->dlpi_phdr[i].p_type == PT_TLS) memset(info->dlpi_tls_data, 0xA5, info->dlpi_phdr[i].p_memsz);
        return 1;
      },
      &base);
}

// A spin that outlasts any real wait (a barrier some block never reaches) stops the process with a message instead of
// hanging the test run: each launch sets a deadline.
inline std::atomic<long long>& spin_deadline_ns() {
  static std::atomic<long long> t{0};
  return t;
}
inline long long now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline void spin_pause_check() {
  static thread_local unsigned spins;  // any start value: only its low bits pace the clock reads
  if ((++spins & 0x3ff) == 0 && now_ns() > spin_deadline_ns().load()) {
    std::fprintf(stderr, "simt: a thread spun past its launch's 60 s deadline (a barrier some block never reaches?)\n");
    std::abort();
  }
  std::this_thread::yield();  // the blocks it waits for are other OS threads
}

// A cooperative launch's grid barrier (portability.cuh's grid_sync): every block's thread 0 meets the others here.
inline std::barrier<>*& grid_barrier_now() {
  static std::barrier<>* b = nullptr;
  return b;
}

// Fiber stacks, reused across launches (allocating and faulting in 512 fresh stacks per block dominated the time).
struct StackPool {
  std::mutex mu;
  std::vector<std::vector<std::unique_ptr<char[]>>> free;
};
inline StackPool& stack_pool() {
  static StackPool p;
  return p;
}

inline void run_block(dim3 grid, dim3 block, unsigned bx, const std::function<void()>& body) {
  std::vector<std::unique_ptr<char[]>> stacks;
  {
    StackPool& pool = stack_pool();
    const std::lock_guard<std::mutex> lock(pool.mu);
    if (!pool.free.empty()) {
      stacks = std::move(pool.free.back());
      pool.free.pop_back();
    }
  }
  while (stacks.size() < block.x) stacks.emplace_back(new char[kStack]);
  struct GiveBack {
    std::vector<std::unique_ptr<char[]>>& s;
    ~GiveBack() {
      StackPool& pool = stack_pool();
      const std::lock_guard<std::mutex> lock(pool.mu);
      pool.free.push_back(std::move(s));
    }
  } give_back{stacks};
  poison_shared_memory();
  Block blk;
  blk.grid = grid;
  blk.block = block;
  blk.block_idx = dim3(bx);
  blk.body = body;
  const int n = static_cast<int>(block.x);
  blk.fibers.resize(n);
  blk.warps.resize((n + kWarp - 1) / kWarp);
  for (size_t w = 0; w < blk.warps.size(); ++w) {
    blk.warps[w].bar.expected = std::min(kWarp, n - static_cast<int>(w) * kWarp);
    for (int l = 0; l < kWarp; ++l) blk.warps[w].alive[l] = l < blk.warps[w].bar.expected;
  }
  blk.bar.expected = n;
  block_now() = &blk;
  for (int t = 0; t < n; ++t) {
    Fiber& f = blk.fibers[t];
    f.tid = t;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[t].get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &blk.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  int left = n, next = 0;
  while (left > 0) {
    int pick = -1;
    for (int i = 0; i < n; ++i) {
      const int t = (next + i) % n;
      if (blk.fibers[t].ready && !blk.fibers[t].done) {
        pick = t;
        break;
      }
    }
    if (pick < 0) {
      block_now() = nullptr;
      throw std::runtime_error("barrier deadlock in block " + std::to_string(bx) +
                               ": threads diverged at __syncthreads or a full-warp primitive");
    }
    blk.current = pick;
    swapcontext(&blk.scheduler, &blk.fibers[pick].ctx);
    if (blk.fibers[pick].done) --left;
    next = pick + 1;
  }
  block_now() = nullptr;
}

// Runs `body` on every thread of every block: waves of kSms blocks, one OS thread each (resident side by side, as
// a grid of at most SMs x occupancy blocks is on a GPU). Throws the first block's error.
inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) throw std::runtime_error("1-D launches only");
  if (block.x == 0 || block.x > 1024) throw std::runtime_error("block size out of range");
  for (unsigned first = 0; first < grid.x; first += kSms) {
    const unsigned last = std::min(grid.x, first + static_cast<unsigned>(kSms));
    std::vector<std::string> errors(last - first);
    std::vector<std::thread> threads;
    for (unsigned bx = first; bx < last; ++bx) {
      threads.emplace_back([&, bx] {
        try {
          run_block(grid, block, bx, body);
        } catch (const std::exception& e) {
          errors[bx - first] = e.what();
        }
      });
    }
    for (std::thread& t : threads) t.join();
    for (const std::string& e : errors)
      if (!e.empty()) throw std::runtime_error(e);
  }
}

// A launch `Launch(grid, block, smem, stream)(kernel, args...)`; cooperative: every block resident at once, so the
// grid may be at most one wave (kSms blocks), and grid_sync() works.
struct Launch {
  dim3 grid, block;
  bool cooperative = false;
  Launch(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr, bool coop = false) : grid(g), block(b), cooperative(coop) {}
  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // by value, as a launch copies them
    if (cooperative && grid.x > static_cast<unsigned>(kSms)) {  // cudaErrorCooperativeLaunchTooLarge
      last_error_text() = "cooperative launch of " + std::to_string(grid.x) + " blocks: more than can be resident";
      return;
    }
    std::barrier<> sync(cooperative ? static_cast<std::ptrdiff_t>(grid.x) : 1);
    if (cooperative) grid_barrier_now() = &sync;
    spin_deadline_ns().store(now_ns() + 60'000'000'000LL);
    try {
      run_grid(grid, block, [&] { std::apply(kernel, params); });
    } catch (const std::exception& e) {
      last_error_text() = e.what();
    }
    if (cooperative) grid_barrier_now() = nullptr;
  }
};

struct Dim3Now {
  unsigned x, y, z;
};

}  // namespace mk_simt

#define threadIdx (::mk_simt::Dim3Now{static_cast<unsigned>(::mk_simt::tid_now()), 0u, 0u})
#define blockIdx (::mk_simt::Dim3Now{::mk_simt::block_now()->block_idx.x, 0u, 0u})
#define blockDim (::mk_simt::Dim3Now{::mk_simt::block_now()->block.x, 1u, 1u})
#define gridDim (::mk_simt::Dim3Now{::mk_simt::block_now()->grid.x, 1u, 1u})

// ---------------------------------------------------------------- runtime calls
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : ::mk_simt::last_error_text().c_str();
}
inline cudaError_t cudaGetLastError() {
  std::string& s = ::mk_simt::last_error_text();
  if (s.empty()) return cudaSuccess;
  return cudaErrorLaunchFailure;  // the text stays for cudaGetErrorString until cleared by the caller
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = ::mk_simt::kSms;
  return cudaSuccess;
}
struct cudaPointerAttributes {
  void* devicePointer = nullptr;
};
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {  // one address space here
  a->devicePointer = const_cast<void*>(p);
  return cudaSuccess;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) {
  *n = 1;
  return cudaSuccess;
}

#if defined(MOEKERN_SIMT_WAVE64)
// HIP's runtime names, onto the CUDA stand-ins above
using hipStream_t = cudaStream_t;
using hipError_t = cudaError_t;
constexpr hipError_t hipSuccess = cudaSuccess;
constexpr hipError_t hipErrorInvalidValue = cudaErrorInvalidValue;
enum hipDeviceAttribute_t : int { hipDeviceAttributeMultiprocessorCount = 16 };
inline const char* hipGetErrorString(hipError_t e) { return cudaGetErrorString(e); }
inline hipError_t hipGetLastError() { return cudaGetLastError(); }
inline hipError_t hipMemsetAsync(void* p, int v, size_t n, hipStream_t s) { return cudaMemsetAsync(p, v, n, s); }
inline hipError_t hipGetDevice(int* d) { return cudaGetDevice(d); }
inline hipError_t hipDeviceGetAttribute(int* v, hipDeviceAttribute_t, int) {
  *v = ::mk_simt::kSms;
  return hipSuccess;
}
inline hipError_t hipOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void* k, int t, size_t s) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, k, t, s);
}
using hipPointerAttribute_t = cudaPointerAttributes;
inline hipError_t hipPointerGetAttributes(hipPointerAttribute_t* a, const void* p) {
  return cudaPointerGetAttributes(a, p);
}
// ROCm's bf16 class: constructed from float with round to nearest even, read back as float
struct hip_bfloat16 {
  unsigned short data = 0;
  hip_bfloat16() = default;
  explicit hip_bfloat16(float f) {
    unsigned u = ::mk_simt::f2u(f);
    if (isnan(f)) {
      data = static_cast<unsigned short>((u >> 16) | 0x40u);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      data = static_cast<unsigned short>(u >> 16);
    }
  }
  explicit operator float() const { return ::mk_simt::u2f(static_cast<unsigned>(data) << 16); }
};
#endif

// ---------------------------------------------------------------- device intrinsics
inline void __syncthreads() { ::mk_simt::arrive_and_wait(::mk_simt::block_now()->bar); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace mk_simt {
// The warp primitives, for either API below: every live lane offers a value, then reads.
inline unsigned shfl_u32(unsigned v, int src) {
  const unsigned r = exchange(v)[src & (kWarp - 1)];
  exchange_done();
  return r;
}
inline mask_t ballot_bits(bool p) {
  const unsigned* all = exchange(p ? 1u : 0u);
  const bool* alive = warp_now().alive;
  mask_t m = 0;
  for (int i = 0; i < kWarp; ++i) m |= (alive[i] && all[i]) ? (mask_t(1) << i) : mask_t(0);
  exchange_done();
  return m;
}
inline mask_t match_bits(unsigned key) {
  const int lane = lane_now();
  const unsigned* all = exchange(key);
  const bool* alive = warp_now().alive;
  mask_t m = 0;
  for (int i = 0; i < kWarp; ++i) m |= (alive[i] && all[i] == all[lane]) ? (mask_t(1) << i) : mask_t(0);
  exchange_done();
  return m;
}
inline void wave_barrier() { arrive_and_wait(warp_now().bar); }
}  // namespace mk_simt

#if !defined(MOEKERN_SIMT_WAVE64)
// CUDA's names (warp of 32; the masks are always the full warp in these kernels)
inline unsigned __shfl_sync(unsigned, unsigned v, int src) { return ::mk_simt::shfl_u32(v, src); }
inline int __shfl_sync(unsigned m, int v, int src) { return static_cast<int>(__shfl_sync(m, static_cast<unsigned>(v), src)); }
inline float __shfl_sync(unsigned m, float v, int src) { return ::mk_simt::u2f(__shfl_sync(m, ::mk_simt::f2u(v), src)); }
inline unsigned __shfl_xor_sync(unsigned m, unsigned v, int x) { return __shfl_sync(m, v, ::mk_simt::lane_now() ^ x); }
inline int __shfl_xor_sync(unsigned m, int v, int x) { return __shfl_sync(m, v, ::mk_simt::lane_now() ^ x); }
inline float __shfl_xor_sync(unsigned m, float v, int x) { return __shfl_sync(m, v, ::mk_simt::lane_now() ^ x); }
inline int __shfl_up_sync(unsigned m, int v, int d) {
  const int lane = ::mk_simt::lane_now();
  return __shfl_sync(m, v, lane >= d ? lane - d : lane);  // below the first lane: the lane's own value
}
inline unsigned __ballot_sync(unsigned, bool p) { return ::mk_simt::ballot_bits(p); }
inline unsigned __match_any_sync(unsigned, unsigned key) { return ::mk_simt::match_bits(key); }
inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  const unsigned* all = ::mk_simt::exchange(v);
  const bool* alive = ::mk_simt::warp_now().alive;
  unsigned r = 0;
  for (int i = 0; i < ::mk_simt::kWarp; ++i) r = alive[i] ? std::max(r, all[i]) : r;
  ::mk_simt::exchange_done();
  return r;
}
inline int __reduce_min_sync(unsigned, int v) {
  const unsigned* all = ::mk_simt::exchange(static_cast<unsigned>(v));
  const bool* alive = ::mk_simt::warp_now().alive;
  int r = INT32_MAX;
  for (int i = 0; i < ::mk_simt::kWarp; ++i) r = alive[i] ? std::min(r, static_cast<int>(all[i])) : r;
  ::mk_simt::exchange_done();
  return r;
}
inline void __syncwarp(unsigned = 0xffffffffu) { ::mk_simt::wave_barrier(); }
#else
// HIP's names (wavefront of 64, no masks); the builtins are macros onto the emulator's own
inline unsigned __shfl(unsigned v, int src) { return ::mk_simt::shfl_u32(v, src); }
inline int __shfl(int v, int src) { return static_cast<int>(::mk_simt::shfl_u32(static_cast<unsigned>(v), src)); }
inline float __shfl(float v, int src) { return ::mk_simt::u2f(::mk_simt::shfl_u32(::mk_simt::f2u(v), src)); }
inline unsigned __shfl_xor(unsigned v, int x) { return __shfl(v, ::mk_simt::lane_now() ^ x); }
inline int __shfl_xor(int v, int x) { return __shfl(v, ::mk_simt::lane_now() ^ x); }
inline float __shfl_xor(float v, int x) { return __shfl(v, ::mk_simt::lane_now() ^ x); }
inline int __shfl_up(int v, int d) {
  const int lane = ::mk_simt::lane_now();
  return __shfl(v, lane >= d ? lane - d : lane);
}
inline unsigned long long __ballot(int p) { return ::mk_simt::ballot_bits(p != 0); }
#define __builtin_amdgcn_wave_barrier() ::mk_simt::wave_barrier()
#define __builtin_amdgcn_s_sleep(n) ::mk_simt::spin_pause_check()
#endif

inline int __popc(unsigned m) { return __builtin_popcount(m); }
inline int __popcll(unsigned long long m) { return __builtin_popcountll(m); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __float_as_uint(float f) { return ::mk_simt::f2u(f); }
inline float __uint_as_float(unsigned u) { return ::mk_simt::u2f(u); }
inline int __float_as_int(float f) { return static_cast<int>(::mk_simt::f2u(f)); }
inline float __int_as_float(int i) { return ::mk_simt::u2f(static_cast<unsigned>(i)); }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// Real atomics: blocks of one wave run on different OS threads.
template <typename T>
inline std::atomic_ref<T> atom(T* p) {
  return std::atomic_ref<T>(*p);
}
inline int atomicAdd(int* p, int v) { return atom(p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return atom(p).fetch_add(v); }
inline float atomicAdd(float* p, float v) { return atom(p).fetch_add(v); }
inline int atomicExch(int* p, int v) { return atom(p).exchange(v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return atom(p).exchange(v); }
inline unsigned atomicInc(unsigned* p, unsigned limit) {  // CUDA: old >= limit ? 0 : old + 1
  std::atomic_ref<unsigned> a(*p);
  unsigned o = a.load();
  while (!a.compare_exchange_weak(o, o >= limit ? 0u : o + 1u)) {
  }
  return o;
}
inline void __nanosleep(unsigned) { ::mk_simt::spin_pause_check(); }

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }

// fp16 / bf16: round to nearest even, as the CUDA intrinsics do
inline float __half2float(__half h) {
  const unsigned s = (h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  if (e == 0) {
    const float v = ldexpf(static_cast<float>(m), -24);
    return s ? -v : v;
  }
  if (e == 31) return ::mk_simt::u2f(s | 0x7f800000u | (m << 13));
  return ::mk_simt::u2f(s | ((e + 112) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {
  const unsigned u = ::mk_simt::f2u(f), s = (u >> 16) & 0x8000u;
  const float a = fabsf(f);
  __half h;
  if (isnan(f)) {
    h.bits = static_cast<unsigned short>(s | 0x7e00u);
  } else if (a >= 65520.0f) {
    h.bits = static_cast<unsigned short>(s | 0x7c00u);
  } else if (a < 6.103515625e-05f) {  // subnormal half: multiples of 2^-24
    h.bits = static_cast<unsigned short>(s | static_cast<unsigned>(nearbyintf(a * 16777216.0f)));
  } else {
    unsigned v = ::mk_simt::f2u(a);
    const unsigned lsb = (v >> 13) & 1u;
    v += 0xfffu + lsb;
    h.bits = static_cast<unsigned short>(s | (((v >> 23) - 112) << 10) | ((v >> 13) & 0x3ffu));
  }
  return h;
}
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __bfloat162float(__nv_bfloat16 b) { return ::mk_simt::u2f(static_cast<unsigned>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = ::mk_simt::f2u(f);
  if (isnan(f)) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
