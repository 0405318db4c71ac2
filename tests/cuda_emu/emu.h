// A CPU stand-in for the CUDA runtime, just enough to run csrc/cuda/*.cu on a machine without a GPU:
// every block of a launch runs on blockDim.x OS threads, __syncthreads is a std::barrier over them,
// warp shuffles exchange through a per-warp buffer behind a 32-thread barrier, atomics are GCC
// atomics, and "device" pointers are host pointers. Blocks run one after another, so it checks the
// kernels' logic and block-level synchronisation, not GPU timing, coalescing or the GPU memory model.
#pragma once

#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

using std::isfinite;

#define __launch_bounds__(...)
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

namespace emu {
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;
inline thread_local uint64_t* warp_slots = nullptr;
inline int sm_count = 4;
inline int smem_optin = 227 * 1024;
inline size_t smem_limit = 0;  // dynamic shared memory allowed by cudaFuncSetAttribute (last call)
inline cudaError_t last_error = cudaSuccess;
inline char* shared_base = nullptr;  // `extern __shared__ char smem_raw[]` is rewritten to point here
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const int lane = threadIdx.x % 32;
  std::memcpy(&emu::warp_slots[lane], &v, sizeof(T));
  emu::warp_barrier->arrive_and_wait();
  T out = v;
  if (lane + offset < 32) std::memcpy(&out, &emu::warp_slots[lane + offset], sizeof(T));
  emu::warp_barrier->arrive_and_wait();
  return out;
}

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline double atomicAdd(double* p, double v) {
  auto* bits = reinterpret_cast<uint64_t*>(p);
  uint64_t old_bits = __atomic_load_n(bits, __ATOMIC_SEQ_CST), new_bits;
  double old;
  do {
    std::memcpy(&old, &old_bits, sizeof(old));
    const double want = old + v;
    std::memcpy(&new_bits, &want, sizeof(want));
  } while (!__atomic_compare_exchange_n(bits, &old_bits, new_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to emu::launch(kernel, grid, block, smem, args...).
namespace emu {
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  const int threads = static_cast<int>(block.x);
  if (block.y != 1 || block.z != 1 || threads % 32 != 0 || grid.z != 1) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > 48 * 1024 && smem > smem_limit) {  // as on a GPU: > 48 KiB needs the opt-in attribute
    last_error = cudaErrorInvalidValue;
    return;
  }
  std::vector<uint64_t> shared_memory(smem / 8 + 2);  // 8-byte aligned; kernels align to 16 within
  shared_base = reinterpret_cast<char*>(shared_memory.data());
  std::barrier<> block_bar(threads);
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<uint64_t> slots(threads);
  for (int w = 0; w < threads / 32; ++w) warp_bars.push_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      block_barrier = &block_bar;
      warp_barrier = warp_bars[t / 32].get();
      warp_slots = slots.data() + (t / 32) * 32;
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      blockDim = block;
      gridDim = grid;
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = {x, y, 0};
          kernel(args...);
          block_bar.arrive_and_wait();  // the block is done before the next one reuses shared memory
        }
      }
    });
  }
  for (auto& th : pool) th.join();
}
}  // namespace emu

// The runtime calls the kernels' host code makes, answered for an imaginary device.
extern "C" {
cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) *value = emu::sm_count;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = emu::smem_optin;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > emu::smem_optin) return cudaErrorInvalidValue;
  emu::smem_limit = static_cast<size_t>(value);
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
}

// nvcc's runtime header has this overload for kernels; the host-only one does not.
template <typename... A>
cudaError_t cudaFuncSetAttribute(void (*kernel)(A...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
