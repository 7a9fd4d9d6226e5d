// Weights in transparent huge pages (Linux).
//
// Decode streams every weight once per token. With 4 KB pages the CPU's
// hardware prefetchers stop at every page boundary and the TLB misses every
// few rows; in 2 MB pages a decode step ran ~9% faster here (4-bit 2B shape,
// the same process with glibc's malloc hugetlb tunable). MLX allocates with
// malloc, which asks for huge pages only when the machine's THP mode is
// `always` (the default mode is `madvise`), and a tunable has to be set
// before the process starts. So a model's weights are copied, once, into one
// 2 MB-aligned arena that asks for huge pages before its first write; the
// arrays returned read it in place and the arena is freed with the last of
// them. An array much larger than 2 MB (the embedding) stays where it is and
// has the 2 MB pages inside it collapsed in place: no second copy of it is
// ever resident.
#include <cstring>
#include <memory>
#include <stdexcept>

#if defined(__linux__) && defined(__GLIBC__)
#include <malloc.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1 (older C headers lack it; older kernels refuse it)
#endif
#endif

#include "kernels.h"

namespace qwen3vl {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kAlignment = 64;  // of each array in the arena: a cache line

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

struct Arena {
  void* data = nullptr;
  size_t bytes = 0;
  ~Arena() {
#ifdef __linux__
    if (data) munmap(data, bytes);
#endif
  }
};

}  // namespace

bool huge_pages_available() {
#ifdef __linux__
  return true;
#else
  return false;
#endif
}

// MLX's CPU allocator keeps each buffer's size in the 8 bytes before its
// data, and a Buffer wraps the address of that header (Buffer::raw_ptr() is
// the header + 8). The arena lays its arrays out the same way; `placeable`
// checks that raw_ptr() agrees before anything is copied.
bool placeable(char* header) {
  return mx::allocator::Buffer(header).raw_ptr() == header + sizeof(size_t);
}

std::vector<mx::array> copy_to_huge_pages(const std::vector<mx::array>& arrays) {
#ifdef __linux__
  size_t total = 0;
  for (const auto& a : arrays) {
    if (!a.is_available())
      throw std::invalid_argument("copy_to_huge_pages: evaluate the arrays first");
    if (!a.flags().row_contiguous) continue;  // strided views stay where they are
    total = round_up(total + sizeof(size_t), kAlignment) + a.nbytes();
  }
  auto arena = std::make_shared<Arena>();
  arena->bytes = round_up(std::max<size_t>(total, 1), kHugePage);
  // One extra huge page of address space so that the arena can start on a
  // 2 MB boundary; the unused parts are unmapped again.
  void* mapped = mmap(nullptr, arena->bytes + kHugePage, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) throw std::bad_alloc();
  char* start = static_cast<char*>(mapped);
  char* aligned = reinterpret_cast<char*>(round_up(reinterpret_cast<uintptr_t>(start), kHugePage));
  if (aligned > start) munmap(start, aligned - start);
  char* end = start + arena->bytes + kHugePage;
  if (end > aligned + arena->bytes) munmap(aligned + arena->bytes, end - (aligned + arena->bytes));
  arena->data = aligned;
  if (!placeable(aligned + kAlignment - sizeof(size_t))) return arrays;
  madvise(aligned, arena->bytes, MADV_HUGEPAGE);  // a hint: without THP this is plain memory

  std::vector<mx::array> placed;
  placed.reserve(arrays.size());
  size_t offset = 0;
  for (const auto& a : arrays) {
    if (!a.flags().row_contiguous) {
      placed.push_back(a);
      continue;
    }
    offset = round_up(offset + sizeof(size_t), kAlignment);
    char* data = aligned + offset;
    char* header = data - sizeof(size_t);
    const size_t nbytes = a.nbytes();
    std::memcpy(header, &nbytes, sizeof nbytes);
    std::memcpy(data, a.data<char>(), nbytes);
    offset += nbytes;
    // Each array holds the arena; the last one to go unmaps it.
    placed.emplace_back(
        mx::allocator::Data(mx::allocator::Buffer(header), [arena](mx::allocator::Buffer) {}),
        a.shape(), a.dtype());
  }
  return placed;
#else
  return arrays;
#endif
}

size_t collapse_to_huge_pages(const mx::array& a) {
#ifdef __linux__
  if (!a.is_available())
    throw std::invalid_argument("collapse_to_huge_pages: evaluate the array first");
  const uintptr_t first = round_up(reinterpret_cast<uintptr_t>(a.data<char>()), kHugePage);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(a.data<char>()) + a.nbytes()) / kHugePage * kHugePage;
  if (last <= first) return 0;
  void* start = reinterpret_cast<void*>(first);
  if (madvise(start, last - first, MADV_HUGEPAGE) != 0) return 0;
  return madvise(start, last - first, MADV_COLLAPSE) == 0 ? last - first : 0;
#else
  return 0;
#endif
}

void release_free_memory() {
#if defined(__linux__) && defined(__GLIBC__)
  // Buffers MLX freed below glibc's mmap threshold stay in the heap; moving
  // the weights out leaves ~10% of them there.
  malloc_trim(0);
#endif
}

}  // namespace qwen3vl
