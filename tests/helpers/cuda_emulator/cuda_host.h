// The CUDA built-ins the kernels in kernels/ use, for a host C++ build that runs them on the CPU.
//
// Every CUDA thread of a CTA is a fiber on one OS thread; CTAs run one after another.
// A fiber runs until it reaches a barrier (__syncthreads, or the warp barrier inside a shuffle) or
// exits; the scheduler then resumes the next fiber whose barrier has completed. So the emulation keeps
// the kernels' barrier semantics exactly, and it reports what the hardware would hang or corrupt on:
// a barrier that some threads of the CTA never reach, a shuffle that not all lanes of a warp execute.
// `__shared__` variables become function statics: all fibers of a CTA share them, and CTAs reuse them.
// Memory is plain host memory, so a launch reads and writes torch CPU tensors by their addresses.
#pragma once

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct __attribute__((aligned(16))) uint4 {
  unsigned int x, y, z, w;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct uint3 {
  unsigned int x, y, z;
};

inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

template <typename To, typename From>
inline To pw_emu_bit_cast(From value) {
  static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
  To result;
  memcpy(&result, &value, sizeof(To));
  return result;
}
inline float __uint_as_float(unsigned int value) { return pw_emu_bit_cast<float>(value); }
inline float __int_as_float(int value) { return pw_emu_bit_cast<float>(value); }
inline unsigned int __float_as_uint(float value) { return pw_emu_bit_cast<unsigned int>(value); }
inline int __float_as_int(float value) { return pw_emu_bit_cast<int>(value); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

namespace pw_emu {

constexpr int kWarpSize = 32;
constexpr size_t kFiberStackBytes = 256 * 1024;

struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned long long generation = 0;
  // Happens-before tokens of even and odd generations: a thread that passed generation g can run on to
  // g + 1 before the others resume from g, but never past it.
  char tokens[2] = {0, 0};
};

// A suspended fiber or the scheduler. On x86-64 a switch saves only the callee-saved registers (a few
// nanoseconds); elsewhere it falls back to ucontext, whose swapcontext costs a system call.
#if defined(__x86_64__)
extern "C" void pw_emu_switch(void** save_stack_pointer, void* load_stack_pointer);
asm(R"(
  .text
  .globl pw_emu_switch
  .hidden pw_emu_switch
  .type pw_emu_switch, @function
pw_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pw_emu_switch, .-pw_emu_switch
)");

struct Context {
  void* stack_pointer = nullptr;
};

inline void switch_context(Context& from, Context& to) { pw_emu_switch(&from.stack_pointer, to.stack_pointer); }

// A stack that the first switch "returns" into `entry` from, as if `entry` had been called.
inline void make_context(Context& context, char* stack, size_t stack_bytes, void (*entry)()) {
  uintptr_t top = ((uintptr_t)(stack + stack_bytes)) & ~(uintptr_t)15;
  uint64_t* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                     // entry's return address: it never returns
  *--slot = reinterpret_cast<uint64_t>(entry);     // popped by `ret`
  for (int i = 0; i < 6; ++i) {
    *--slot = 0;                                   // rbp, rbx, r12-r15
  }
  *--slot = (uint64_t)0x1f80u | ((uint64_t)0x037fu << 32);  // default MXCSR and x87 control word
  context.stack_pointer = slot;
}
#else
struct Context {
  ucontext_t context;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

inline void make_context(Context& context, char* stack, size_t stack_bytes, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = stack_bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}
#endif

// AddressSanitizer (`-fsanitize=address`, see host_library.py) must hear of every stack switch.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define PW_EMU_ASAN 1
#else
#define PW_EMU_ASAN 0
#endif

// ThreadSanitizer (`-fsanitize=thread`) sees every CUDA thread as a fiber of its own, synchronised
// only where CUDA synchronises: at barriers and warp shuffles (acquire/release on a token per barrier
// generation). It then reports what compute-sanitizer's racecheck reports within a CTA: two threads
// touching the same memory, one of them writing, with no barrier between. CTAs run one after the
// other, each ordered after the previous one, so races between CTAs go unseen. The emulator's own
// bookkeeping is not instrumented (PW_EMU_INTERNAL).
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define PW_EMU_TSAN 1
#define PW_EMU_INTERNAL __attribute__((no_sanitize("thread"), noinline))
#else
#define PW_EMU_TSAN 0
#define PW_EMU_INTERNAL
#endif

inline void tsan_release(void* token) {
#if PW_EMU_TSAN
  __tsan_release(token);
#endif
}

inline void tsan_acquire(void* token) {
#if PW_EMU_TSAN
  __tsan_acquire(token);
#endif
}

struct Fiber {
  Context context;
  char* stack = nullptr;
  void* tsan_fiber = nullptr;
  uint3 index;
  bool is_done = false;
  const Barrier* waiting_on = nullptr;
  unsigned long long waiting_generation = 0;
};

struct Cta {
  uint3 block_index;
  uint3 block_dim;
  uint3 grid_dim;
  int num_threads = 0;
  std::vector<Fiber> fibers;
  Barrier cta_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<unsigned long long> shuffle_slots;
  Context scheduler;
  void* tsan_scheduler = nullptr;
  char start_token = 0;  // released by the scheduler before a CTA's threads start
  char end_token = 0;    // released by each thread as it ends
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_bytes = 0;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::string error;
};

inline thread_local Cta* current_cta = nullptr;

PW_EMU_INTERNAL inline Fiber& current_fiber() { return current_cta->fibers[current_cta->current]; }

PW_EMU_INTERNAL inline int linear_thread_id() {
  const uint3& t = current_fiber().index;
  const Cta& cta = *current_cta;
  return (int)(t.x + cta.block_dim.x * (t.y + cta.block_dim.y * t.z));
}

// Scheduler -> fiber; returns when the fiber waits at a barrier or ends.
PW_EMU_INTERNAL inline void resume_fiber(Cta& cta, Fiber& fiber) {
#if PW_EMU_TSAN
  __tsan_switch_to_fiber(fiber.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if PW_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, fiber.stack, kFiberStackBytes);
#endif
  switch_context(cta.scheduler, fiber.context);
#if PW_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// Fiber -> scheduler; `is_final` when the fiber never runs again.
PW_EMU_INTERNAL inline void yield_to_scheduler(Cta& cta, Fiber& self, bool is_final) {
#if PW_EMU_TSAN
  __tsan_switch_to_fiber(cta.tsan_scheduler, __tsan_switch_to_fiber_no_sync);
#endif
#if PW_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(is_final ? nullptr : &fake_stack, cta.scheduler_stack_bottom,
                                 cta.scheduler_stack_bytes);
#endif
  switch_context(self.context, cta.scheduler);
#if PW_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// Records the first error of the CTA and parks the fiber for good: the scheduler stops the launch.
PW_EMU_INTERNAL inline void fail(const std::string& message) {
  Cta& cta = *current_cta;
  if (cta.error.empty()) {
    cta.error = message;
  }
  Fiber& self = current_fiber();
  self.is_done = true;
  yield_to_scheduler(cta, self, true);
}

PW_EMU_INTERNAL inline void arrive_and_wait(Barrier& barrier) {
  Cta& cta = *current_cta;
  char* token = &barrier.tokens[barrier.generation & 1];
  tsan_release(token);
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    tsan_acquire(token);
    return;
  }
  Fiber& self = current_fiber();
  self.waiting_on = &barrier;
  self.waiting_generation = barrier.generation;
  yield_to_scheduler(cta, self, false);
  tsan_acquire(token);
}

// Runs the kernel as the current fiber, then hands control back for good (it must never return).
PW_EMU_INTERNAL inline void fiber_entry() {
  Cta& cta = *current_cta;
#if PW_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &cta.scheduler_stack_bottom, &cta.scheduler_stack_bytes);
#endif
  tsan_acquire(&cta.start_token);
  (*cta.body)();
  tsan_release(&cta.end_token);
  Fiber& self = current_fiber();
  self.is_done = true;
  yield_to_scheduler(cta, self, true);
  abort();
}

// Runs one CTA to completion; returns false (with cta.error set) when it cannot complete.
PW_EMU_INTERNAL inline bool run_cta(Cta& cta, std::vector<char*>& stacks) {
  // After the previous CTA's threads: stacks, shared memory and the bookkeeping are reused in order.
  tsan_acquire(&cta.end_token);
  const int n = cta.num_threads;
  cta.fibers.assign(n, Fiber{});
  cta.cta_barrier = Barrier{n, 0, 0};
  const int num_warps = (n + kWarpSize - 1) / kWarpSize;
  cta.warp_barriers.assign(num_warps, Barrier{});
  for (int w = 0; w < num_warps; ++w) {
    cta.warp_barriers[w].expected = (w + 1) * kWarpSize <= n ? kWarpSize : n - w * kWarpSize;
  }
  cta.shuffle_slots.assign(n, 0);
  for (int i = 0; i < n; ++i) {
    Fiber& fiber = cta.fibers[i];
    fiber.index = {(unsigned)(i % cta.block_dim.x), (unsigned)((i / cta.block_dim.x) % cta.block_dim.y),
                   (unsigned)(i / (cta.block_dim.x * cta.block_dim.y))};
    fiber.stack = stacks[i];
    make_context(fiber.context, stacks[i], kFiberStackBytes, fiber_entry);
#if PW_EMU_TSAN
    fiber.tsan_fiber = __tsan_create_fiber(0);
#endif
  }
#if PW_EMU_TSAN
  cta.tsan_scheduler = __tsan_get_current_fiber();
#endif
  tsan_release(&cta.start_token);
  struct FiberReleaser {
    Cta& cta;
    ~FiberReleaser() {
#if PW_EMU_TSAN
      for (Fiber& fiber : cta.fibers) {
        __tsan_destroy_fiber(fiber.tsan_fiber);
      }
#endif
    }
  } releaser{cta};
  int live = n;
  while (live > 0) {
    bool resumed = false;
    for (int i = 0; i < n; ++i) {
      Fiber& fiber = cta.fibers[i];
      if (fiber.is_done || (fiber.waiting_on != nullptr && fiber.waiting_on->generation == fiber.waiting_generation)) {
        continue;
      }
      fiber.waiting_on = nullptr;
      cta.current = i;
      resume_fiber(cta, fiber);
      resumed = true;
      if (!cta.error.empty()) {
        return false;
      }
      if (fiber.is_done) {
        --live;
      }
    }
    if (!resumed) {
      int waiting_cta = 0;
      int waiting_warp = 0;
      for (const Fiber& fiber : cta.fibers) {
        if (!fiber.is_done) {
          (fiber.waiting_on == &cta.cta_barrier ? waiting_cta : waiting_warp) += 1;
        }
      }
      char message[256];
      snprintf(message, sizeof message,
               "deadlock in CTA (%u, %u, %u): %d threads wait at __syncthreads and %d at a warp shuffle "
               "that %d exited threads will never reach",
               cta.block_index.x, cta.block_index.y, cta.block_index.z, waiting_cta, waiting_warp, n - live);
      cta.error = message;
      return false;
    }
  }
  return true;
}

// Runs body() as every thread of every CTA of the grid; returns an error message or "".
PW_EMU_INTERNAL inline std::string run_grid(const unsigned* grid, const unsigned* block,
                                            const std::function<void()>& body) {
  const long long num_threads = (long long)block[0] * block[1] * block[2];
  if (num_threads <= 0 || num_threads > 1024) {
    return "a CTA must have 1..1024 threads, got " + std::to_string(num_threads);
  }
  if (grid[1] > 65535 || grid[2] > 65535) {
    return "grid dimensions y and z must be at most 65535";
  }
  std::vector<char*> stacks(num_threads);
  for (char*& stack : stacks) {
    stack = static_cast<char*>(malloc(kFiberStackBytes));
  }
  Cta cta;
  cta.block_dim = {block[0], block[1], block[2]};
  cta.grid_dim = {grid[0], grid[1], grid[2]};
  cta.num_threads = (int)num_threads;
  cta.body = &body;
  Cta* previous = current_cta;
  current_cta = &cta;
  std::string error;
  for (unsigned z = 0; z < grid[2] && error.empty(); ++z) {
    for (unsigned y = 0; y < grid[1] && error.empty(); ++y) {
      for (unsigned x = 0; x < grid[0] && error.empty(); ++x) {
        cta.block_index = {x, y, z};
        if (!run_cta(cta, stacks)) {
          error = cta.error;
        }
      }
    }
  }
  tsan_acquire(&cta.end_token);
  current_cta = previous;
  for (char* stack : stacks) {
    free(stack);
  }
  return error;
}

template <typename... Args, size_t... I>
void invoke(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<Args>*>(args[I])...);
}

// cuLaunchKernel's convention: args[i] points at the value of parameter i.
template <typename... Args>
int launch(void (*kernel)(Args...), const unsigned* grid, const unsigned* block, void** args, char* error,
           int error_bytes) {
  const std::function<void()> body = [&] { invoke(kernel, args, std::index_sequence_for<Args...>{}); };
  const std::string message = run_grid(grid, block, body);
  snprintf(error, (size_t)error_bytes, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

template <typename A>
constexpr char type_code() {
  return std::is_pointer_v<A> ? 'p' : std::is_floating_point_v<A> ? 'f' : std::is_signed_v<A> ? 'i' : 'u';
}

// The parameters of `kernel` as "<code><bytes>" words ("p8 i4 f4"), to check arguments before a launch.
template <typename... Args>
int signature(void (*)(Args...), char* out, int out_bytes) {
  std::string text;
  ((text += std::string(1, type_code<Args>()) + std::to_string(sizeof(Args)) + " "), ...);
  snprintf(out, (size_t)out_bytes, "%s", text.c_str());
  return (int)sizeof...(Args);
}

}  // namespace pw_emu

#define threadIdx (::pw_emu::current_fiber().index)
#define blockIdx (::pw_emu::current_cta->block_index)
#define blockDim (::pw_emu::current_cta->block_dim)
#define gridDim (::pw_emu::current_cta->grid_dim)

inline void __syncthreads() { pw_emu::arrive_and_wait(pw_emu::current_cta->cta_barrier); }

template <typename T>
PW_EMU_INTERNAL T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = pw_emu::kWarpSize) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffles move at most 8 bytes");
  pw_emu::Cta& cta = *pw_emu::current_cta;
  const int tid = pw_emu::linear_thread_id();
  const int warp = tid / pw_emu::kWarpSize;
  const int lane = tid % pw_emu::kWarpSize;
  pw_emu::Barrier& barrier = cta.warp_barriers[warp];
  const unsigned full = barrier.expected == 32 ? 0xffffffffu : (1u << barrier.expected) - 1u;
  if (mask != full || width != pw_emu::kWarpSize) {
    pw_emu::fail("the emulator supports shuffles over whole warps only (mask " + std::to_string(mask) + ")");
  }
  unsigned long long bits = 0;
  memcpy(&bits, &value, sizeof(T));
  cta.shuffle_slots[tid] = bits;
  pw_emu::arrive_and_wait(barrier);
  const int source_lane = lane ^ lane_mask;
  const unsigned long long source =
      source_lane < barrier.expected ? cta.shuffle_slots[warp * pw_emu::kWarpSize + source_lane] : bits;
  pw_emu::arrive_and_wait(barrier);
  T result;
  memcpy(&result, &source, sizeof(T));
  return result;
}

// A compare-and-swap loop, so that ThreadSanitizer sees an atomic read-modify-write.
inline float atomicAdd(float* address, float value) {
  unsigned int* bits = reinterpret_cast<unsigned int*>(address);
  unsigned int expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(bits, &expected, __float_as_uint(__uint_as_float(expected) + value), false,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return __uint_as_float(expected);
}
