// Just enough of the Metal Shading Language, with its semantics, to run a kernel body on the CPU: one
// OS thread per GPU thread, threadgroups one at a time, the threads of a group concurrently. Barriers are
// real barriers, simd reductions exchange values across the 32 lanes of a simdgroup in lockstep, and
// threadgroup memory is one block per group, poisoned (all bits set: NaN for floats) when the group starts.
// The kernel source follows this header; `harness.py` writes the signature MLX would write around it.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

using uint = uint32_t;
struct uint3 {
  uint x, y, z;
};
using half = _Float16;  // IEEE binary16, as Metal's half

// bfloat16 stored faithfully: a float rounded to nearest even on every store.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = std::isnan(f) ? 0x7FC0 : uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
using bfloat = bfloat16_t;

namespace dla_emu {

constexpr int SIMD = 32;

struct Group {  // the threadgroup being run
  explicit Group(int size)
      : size(size), all(size), lanes(size_t(size), 0.0) {
    for (int s = 0; s < size; s += SIMD) simd.push_back(std::make_unique<std::barrier<>>(std::min(SIMD, size - s)));
  }
  int size;
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> simd;
  std::vector<double> lanes;  // one exchange slot per thread, for simd reductions
  std::mutex memory_lock;
  std::vector<std::pair<int, std::vector<unsigned char>>> memory;  // threadgroup memory, by declaration
};

struct Thread {  // the Metal attributes of the running thread
  uint3 grid_pos, group_pos, pos_in_group;
  uint index_in_group, lane, simdgroup;
  Group* group;
};
inline thread_local Thread self;

// The block of threadgroup memory of declaration `id` (the same block for every thread of the group).
template <class T>
T& threadgroup_memory(int id) {
  Group& g = *self.group;
  std::lock_guard<std::mutex> lock(g.memory_lock);
  for (auto& [key, block] : g.memory)
    if (key == id) return *reinterpret_cast<T*>(block.data());
  g.memory.emplace_back(id, std::vector<unsigned char>(sizeof(T), 0xFF));
  return *reinterpret_cast<T*>(g.memory.back().second.data());
}

// Runs `body` for every thread of a grid of `grid` threads in threadgroups of `group` threads.
inline void run_grid(uint3 grid, uint3 group, const std::function<void()>& body) {
  if (grid.x % group.x || grid.y % group.y || grid.z % group.z)
    throw std::invalid_argument("the harness runs uniform threadgroups only: grid must be a multiple of threadgroup");
  int size = int(group.x * group.y * group.z);
  for (uint gz = 0; gz < grid.z / group.z; ++gz)
    for (uint gy = 0; gy < grid.y / group.y; ++gy)
      for (uint gx = 0; gx < grid.x / group.x; ++gx) {
        Group g(size);
        std::vector<std::thread> threads;
        for (int i = 0; i < size; ++i) {
          uint3 p = {uint(i) % group.x, uint(i) / group.x % group.y, uint(i) / (group.x * group.y)};
          uint3 tg = {gx, gy, gz};
          threads.emplace_back([&g, &body, i, p, tg, group] {
            self = Thread{{tg.x * group.x + p.x, tg.y * group.y + p.y, tg.z * group.z + p.z}, tg, p, uint(i),
                          uint(i % SIMD), uint(i / SIMD), &g};
            body();
          });
        }
        for (auto& t : threads) t.join();
      }
}

// All lanes of the caller's simdgroup exchange `x`; returns the values in lane order.
template <class T>
std::vector<T> simd_exchange(T x) {
  Group& g = *self.group;
  auto& barrier = *g.simd[self.simdgroup];
  int first = int(self.simdgroup) * SIMD, n = std::min(SIMD, g.size - first);
  g.lanes[self.index_in_group] = double(x);
  barrier.arrive_and_wait();
  std::vector<T> out(n);
  for (int i = 0; i < n; ++i) out[i] = T(g.lanes[first + i]);
  barrier.arrive_and_wait();  // the slots are written again by the next exchange
  return out;
}

}  // namespace dla_emu

enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };

inline void threadgroup_barrier(mem_flags) { dla_emu::self.group->all.arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) { dla_emu::self.group->simd[dla_emu::self.simdgroup]->arrive_and_wait(); }

template <class T>
T simd_sum(T x) {
  T total = T(0);
  for (T v : dla_emu::simd_exchange(x)) total += v;
  return total;
}
template <class T>
T simd_max(T x) {
  auto v = dla_emu::simd_exchange(x);
  T m = v[0];
  for (T y : v) m = y > m ? y : m;
  return m;
}
template <class T>
T simd_shuffle(T x, uint lane) { return dla_emu::simd_exchange(x)[lane]; }
template <class T>
T simd_shuffle_down(T x, uint delta) {
  auto v = dla_emu::simd_exchange(x);
  uint i = dla_emu::self.lane + delta;
  return i < v.size() ? v[i] : x;
}
template <class T>
T simd_broadcast(T x, uint lane) { return simd_shuffle(x, lane); }

using std::abs, std::ceil, std::exp, std::floor, std::isnan, std::log, std::max, std::min, std::sqrt, std::tanh;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
namespace metal {
using std::abs, std::ceil, std::exp, std::floor, std::isnan, std::log, std::max, std::min, std::sqrt, std::tanh;
using ::rsqrt;
}  // namespace metal

// Address spaces are plain memory on the CPU; `harness.py` turns threadgroup declarations into
// `dla_emu::threadgroup_memory` before compiling.
#define device
#define constant
#define thread
#define threadgroup
