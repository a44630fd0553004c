// A CUDA execution model on the CPU, for checking kernels where there is no GPU.
//
// The kernels of kernels/ compile as host C++ with this header in front of common.cuh (g++ -std=c++20
// -DHIGHRISE_EMU). Every CUDA thread of a block is a fiber (ucontext) on one OS thread; the fibers
// run in turn until each reaches a barrier (__syncthreads, or a warp-wide instruction: shuffles,
// mma.sync, ldmatrix), so the warp-level instructions see all 32 lanes' operands at once, as the
// hardware does. Blocks are spread over the OS threads. What this checks: the arithmetic and every
// fragment layout (mma.sync m16n8k16, ldmatrix with and without .trans), shared memory staged by
// cp.async landing only when its thread waits for its group (a missing wait reads stale data, as on
// a GPU), __syncthreads between writers and readers, and shared-memory bank conflicts of ldmatrix
// (counted; tests assert a swizzled layout has none). What it does not: timing, the memory model
// beyond barriers, and tensor-core rounding (products are exact in f32 as on the GPU; sums are f32).
//
// __shared__ variables become `static thread_local`: one copy per OS thread, which runs one block at
// a time, i.e. one copy per block, uninitialized between blocks as on a GPU.

#pragma once
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define HIGHRISE_EMU 1
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {

struct Copy {
    void* dst;
    const void* src;
    unsigned bytes, src_bytes;
};

// Switching fibers: on x86-64 a few instructions saving the callee-saved registers on the fiber's
// own stack (glibc's swapcontext also saves the signal mask, a system call per switch); ucontext
// elsewhere.
#if defined(__x86_64__)
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .weak emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#endif

struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr;
    emu_dim3 tid;
    unsigned lane, warp;
    bool done = false;
    bool pdl_waited = false;               // griddepcontrol.wait executed
    std::vector<Copy> open;                // cp.async copies not yet committed
    std::vector<std::vector<Copy>> groups;  // committed groups, oldest first
};

struct Barrier {
    unsigned arrived = 0, generation = 0;
};

// One wgmma.mma_async as issued by a warpgroup: its operands are read (shared memory through the
// descriptors, A's registers through the issuing threads' pointers) and its accumulators written only
// when the warpgroup waits for its group, as on the GPU, where they are in flight until then.
struct WgmmaOp {
    unsigned n;
    bool bf16, a_in_regs, tnsp_b;
    int scale_d;
    uint64_t desc_a, desc_b;
    const uint32_t* a[128];  // per thread of the warpgroup: its 4 registers of A (a_in_regs)
    float* d[128];           // per thread: its n/2 accumulators
};

struct Warpgroup {
    Barrier barrier;
    std::vector<WgmmaOp> open;                // issued, not yet committed
    std::vector<std::vector<WgmmaOp>> groups;  // committed groups, oldest first
};

// A tensor map as this model's host side writes it (crates/highrise-cuda/src/tma.rs's `emu_bytes`;
// the GPU's own format is opaque): dims and box innermost first, strides in bytes of dims 1.., the
// swizzle in bytes (0 or 128).
struct TensorMap {
    uint64_t base;
    uint32_t rank, elem_bytes;
    uint64_t dims[5], strides[5];
    uint32_t box[5], swizzle;
};
static_assert(sizeof(TensorMap) <= 128, "a tensor map is 128 bytes");

struct TmaCopy {
    void* dst;
    TensorMap map;
    int coords[5];
};

// An mbarrier: arrivals expected a phase, those still to come, bytes still to land (TMA copies
// completing on it, which land only when a thread waits on it), phases completed.
struct Mbar {
    unsigned count = 0, pending = 0, phase = 0;
    long long tx = 0;
    std::vector<TmaCopy> copies;
    // cp.async.mbarrier.arrive.noinc: per arrival, the cp.async copies it waits for.
    std::vector<std::vector<Copy>> async_arrivals;
};

struct Block {
    emu_dim3 bid, bdim, gdim;
    std::map<const void*, Mbar> mbars;
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    void* scheduler_sp = nullptr;
    unsigned current = 0, live = 0, stalls = 0;
    bool aborted = false;
    bool pdl = false;  // launched as a programmatic dependent: every thread must wait (common.cuh)
    Barrier block_barrier;
    Barrier named[16];  // bar.sync / bar.arrive with an id (0: __syncthreads' own)
    std::vector<Barrier> warp_barriers;
    std::vector<Warpgroup> warpgroups;
    std::vector<const void*> slots;  // per thread: the address of its operand of a warp instruction
    const std::function<void()>* body = nullptr;
    std::vector<char> dynamic_shared;
};

inline thread_local Block* blk = nullptr;
inline std::atomic<unsigned long long> bank_conflicts{0}, ldmatrix_count{0};

inline Fiber& me() { return blk->fibers[blk->current]; }

// A launch's first fault (what the hardware would report as an error), and whether there was one.
inline std::atomic<bool> failed{false};
inline std::mutex fault_lock;
inline std::string fault;

inline void yield();

// The first fault of a launch, where it is found outside a thread (`fail` is within one).
inline void record_fault(const std::string& what) {
    std::lock_guard<std::mutex> g(fault_lock);
    if (!failed.exchange(true)) fault = what;
}

// griddepcontrol.wait: nothing to wait for here, where kernels run one after another; what is
// checked is that a kernel launched as a programmatic dependent executes it in every thread (a
// thread that touched memory without it would race the kernel before it on a GPU).
inline void pdl_wait() { me().pdl_waited = true; }

// A fault: recorded, the block stopped (its fibers are never resumed), the launch fails.
[[noreturn]] inline void fail(const char* what) {
    {
        std::lock_guard<std::mutex> g(fault_lock);
        if (!failed.exchange(true)) {
            char where[96];
            std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u)", blk->bid.x, blk->bid.y, blk->bid.z, me().tid.x);
            fault = std::string(what) + where;
        }
    }
    blk->aborted = true;
    for (;;) yield();
}

inline void yield() {
#ifdef EMU_FAST_SWITCH
    emu_switch(&me().sp, blk->scheduler_sp);
#else
    swapcontext(&me().ctx, &blk->scheduler);
#endif
}

// Waits until `n` fibers have arrived at `b`.
inline void arrive(Barrier& b, unsigned n) {
    const unsigned gen = b.generation;
    if (++b.arrived == n) {
        b.arrived = 0;
        b.generation++;
        blk->stalls = 0;
        return;
    }
    while (b.generation == gen) {
        if (++blk->stalls > 4 * blk->fibers.size() + 64) fail("deadlock: threads wait at barriers that can never complete");
        yield();
    }
}

inline void syncthreads() { arrive(blk->block_barrier, blk->live); }

inline void syncwarp() {
    Fiber& f = me();
    const unsigned first = f.warp * 32, lanes = std::min<unsigned>(32, (unsigned)blk->fibers.size() - first);
    for (unsigned i = first; i < first + lanes; i++)
        if (blk->fibers[i].done) fail("a warp-wide instruction with lanes that have exited");
    arrive(blk->warp_barriers[f.warp], lanes);
}

// A warp-wide exchange: each lane offers the address of its operand; `read` gets every lane's (by
// lane index) once all have arrived; the lanes wait again before leaving, so the operands stay live.
template <class T, class F>
inline void exchange(const T& mine, F read) {
    Fiber& f = me();
    blk->slots[f.warp * 32 + f.lane] = &mine;
    syncwarp();
    const void* const* base = &blk->slots[f.warp * 32];
    read([base](unsigned lane) -> const T& { return *static_cast<const T*>(base[lane]); });
    syncwarp();
}

template <class T>
inline T shfl_xor(T v, int mask) {
    T out{};
    const unsigned lane = me().lane;
    exchange(v, [&](auto at) { out = at(lane ^ (unsigned)mask); });
    return out;
}

template <class T>
inline T shfl_up(T v, unsigned delta) {
    T out{};
    const unsigned lane = me().lane;
    exchange(v, [&](auto at) { out = lane >= delta ? at(lane - delta) : v; });
    return out;
}

template <class T>
inline T shfl(T v, int src) {
    T out{};
    exchange(v, [&](auto at) { out = at((unsigned)src & 31); });
    return out;
}

// ---- f16 / bf16 ----

inline float f16_to_f32(uint16_t h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
inline uint16_t f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    uint16_t h;
    std::memcpy(&h, &x, 2);
    return h;
}
inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
inline float half_to_f32(uint16_t h, bool bf16) { return bf16 ? bf16_to_f32(h) : f16_to_f32(h); }

// ---- tensor cores: mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32 ----

struct MmaOperands {
    uint32_t a[4], b[2];
};

// The fragment layouts of the PTX ISA (section "Matrix Fragments for mma.m16n8k16"): lane = 4 g + q;
// A (16x16, row): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..);
// B (16x8, col): b0 = (k 2q..2q+1, n g), b1 = (k 2q+8.., n g); C/D: c0,c1 = (g, 2q..), c2,c3 = (g+8, 2q..).
inline void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16) {
    MmaOperands mine;
    std::memcpy(mine.a, a, 16);
    mine.b[0] = b0;
    mine.b[1] = b1;
    const unsigned lane = me().lane, g = lane / 4, q = lane % 4;
    float result[4];
    exchange(mine, [&](auto at) {
        auto A = [&](unsigned row, unsigned col) {
            const unsigned owner = (row % 8) * 4 + (col % 8) / 2;
            const unsigned reg = (row / 8) + 2 * (col / 8);
            const uint32_t w = at(owner).a[reg];
            return half_to_f32((uint16_t)(col % 2 ? w >> 16 : w), bf16);
        };
        auto B = [&](unsigned k, unsigned n) {
            const unsigned owner = n * 4 + (k % 8) / 2;
            const uint32_t w = at(owner).b[k / 8];
            return half_to_f32((uint16_t)(k % 2 ? w >> 16 : w), bf16);
        };
        for (int e = 0; e < 4; e++) {
            const unsigned row = g + 8 * (e / 2), col = 2 * q + (e % 2);
            float acc = c[e];
            for (unsigned k = 0; k < 16; k++) acc += A(row, k) * B(k, col);
            result[e] = acc;
        }
    });
    std::memcpy(c, result, 16);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of matrix
// i; register i of lane 4g + q gets matrix i's (row g, cols 2q, 2q+1), or with .trans (rows 2q, 2q+1
// of col g). Also counts bank conflicts: each matrix is one shared-memory access of 8 rows of 16 B.
inline void ldmatrix_x4(uint32_t* r, const void* row_addr, bool trans) {
    if ((uintptr_t)row_addr % 16) fail("ldmatrix: a row address not 16-byte aligned");
    const unsigned lane = me().lane, g = lane / 4, q = lane % 4;
    exchange(row_addr, [&](auto at) {
        for (unsigned i = 0; i < 4; i++) {
            auto elt = [&](unsigned row, unsigned col) {
                return static_cast<const uint16_t*>(at(8 * i + row))[col];
            };
            const uint16_t lo = trans ? elt(2 * q, g) : elt(g, 2 * q);
            const uint16_t hi = trans ? elt(2 * q + 1, g) : elt(g, 2 * q + 1);
            r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
        if (lane == 0) {
            unsigned long long conflicts = 0;
            for (unsigned i = 0; i < 4; i++) {
                // Wavefronts for the 8 rows: per bank, the distinct 128-byte lines touching it.
                unsigned worst = 1;
                for (unsigned bank = 0; bank < 32; bank++) {
                    uintptr_t lines[8];
                    unsigned n = 0;
                    for (unsigned row = 0; row < 8; row++) {
                        const uintptr_t a = (uintptr_t)at(8 * i + row);
                        if ((a / 4) % 32 / 4 != bank / 4) continue;
                        const uintptr_t line = a / 128;
                        if (std::find(lines, lines + n, line) == lines + n) lines[n++] = line;
                    }
                    worst = std::max(worst, n);
                }
                conflicts += worst - 1;
            }
            bank_conflicts += conflicts;
            ldmatrix_count += 4;
        }
    });
}

// ---- cp.async: 16-byte copies that land when their thread waits for their group ----

inline void cp_async16(void* dst, const void* src, unsigned src_bytes) {
    if ((uintptr_t)dst % 16 || (src_bytes && (uintptr_t)src % 16)) fail("cp.async: an address not 16-byte aligned");
    me().open.push_back({dst, src, 16, src_bytes});
}
inline void cp_async_commit() {
    Fiber& f = me();
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
inline void land(const Copy& c) {
    std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset((char*)c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
}
inline void cp_async_wait(unsigned pending) {
    Fiber& f = me();
    while (f.groups.size() > pending) {
        for (const Copy& c : f.groups.front()) land(c);
        f.groups.erase(f.groups.begin());
    }
}

// ---- TMA and mbarriers (sm_90a) ----
//
// mbarrier.init / arrive(.expect_tx) / try_wait.parity on a barrier in shared memory (kept beside the
// block, by address), and cp.async.bulk.tensor's tile mode with the 128-byte swizzle (or none): the
// box lands (elements outside the tensor as zeros, all counted) when a thread waits on the barrier
// the copy completes on, so a read before the wait sees stale data, as on a GPU.

inline Mbar& mbar_of(const void* bar) {
    if ((uintptr_t)bar % 8) fail("mbarrier: not 8-byte aligned");
    auto it = blk->mbars.find(bar);
    if (it == blk->mbars.end()) fail("mbarrier: used before mbarrier.init");
    return it->second;
}

inline void mbar_init(const void* bar, unsigned count) {
    if ((uintptr_t)bar % 8) fail("mbarrier: not 8-byte aligned");
    if (count == 0) fail("mbarrier.init: a count of 0");
    Mbar& m = blk->mbars[bar];
    m = Mbar{};
    m.count = m.pending = count;
}

// The phase completes once every arrival came and every byte landed.
inline void mbar_settle(Mbar& m) {
    if (m.pending == 0 && m.tx == 0) {
        m.phase++;
        m.pending = m.count;
    }
}

inline void mbar_arrive(const void* bar, unsigned bytes) {
    Mbar& m = mbar_of(bar);
    if (m.pending == 0) fail("mbarrier: more arrivals than its count");
    m.tx += bytes;
    m.pending--;
    mbar_settle(m);
}

// cp.async.mbarrier.arrive.noinc: every cp.async this thread issued so far (committed or not)
// completes on the barrier as one of its expected arrivals; they land, and the arrival counts, when
// a thread waits on the barrier.
// With `eager_copies` they land and arrive at once instead (copies faster than anything else): a
// stage refilled while a consumer still reads it shows then, as a late read shows the other way.
inline bool eager_copies = false;
inline void cp_async_mbar_arrive(const void* bar) {
    Fiber& f = me();
    Mbar& m = mbar_of(bar);
    std::vector<Copy> all;
    for (std::vector<Copy>& g : f.groups) all.insert(all.end(), g.begin(), g.end());
    all.insert(all.end(), f.open.begin(), f.open.end());
    f.groups.clear();
    f.open.clear();
    if (!eager_copies) return m.async_arrivals.push_back(std::move(all));
    for (const Copy& c : all) land(c);
    mbar_arrive(bar, 0);
}

// Named barriers (bar.sync / bar.arrive id, count): `count` threads, in whole warps, complete a
// phase; bar.arrive counts its warp without waiting.
inline Barrier& named_barrier(unsigned id, unsigned count) {
    if (id == 0 || id >= 16) fail("bar.sync / bar.arrive: barrier ids 1-15 (0 is __syncthreads')");
    if (count == 0 || count % 32 || count > blk->fibers.size()) fail("bar.sync / bar.arrive: a thread count not a multiple of 32 up to the block's");
    return blk->named[id];
}
inline void named_bar_sync(unsigned id, unsigned count) { arrive(named_barrier(id, count), count); }
inline void named_bar_arrive(unsigned id, unsigned count) {
    Barrier& b = named_barrier(id, count);
    if (++b.arrived == count) {
        b.arrived = 0;
        b.generation++;
        blk->stalls = 0;
    }
}

inline void tma_land(const TmaCopy& c) {
    const TensorMap& t = c.map;
    uint64_t n = 1;
    for (unsigned i = 0; i < t.rank; i++) n *= t.box[i];
    const unsigned row_bytes = t.box[0] * t.elem_bytes;
    for (uint64_t e = 0; e < n; e++) {
        // Element e of the box (dim 0 fastest), its place in the tensor and in shared memory.
        uint64_t rest = e, src = t.base;
        bool inside = true;
        for (unsigned i = 0; i < t.rank; i++) {
            const long long at = (long long)c.coords[i] + (long long)(rest % t.box[i]);
            rest /= t.box[i];
            inside &= at >= 0 && (uint64_t)at < t.dims[i];
            src += (uint64_t)at * (i == 0 ? t.elem_bytes : t.strides[i]);
        }
        uint64_t off = e / t.box[0] * row_bytes + e % t.box[0] * t.elem_bytes;
        if (t.swizzle == 128) off ^= ((off >> 7) & 7) << 4;
        char* d = (char*)c.dst + off;
        if (inside) std::memcpy(d, (const void*)src, t.elem_bytes);
        else std::memset(d, 0, t.elem_bytes);
    }
}

inline void tma_load(void* dst, const void* map, const void* bar, int c0, int c1, int c2) {
    TmaCopy c{dst, {}, {c0, c1, c2, 0, 0}};
    std::memcpy(&c.map, map, sizeof(TensorMap));
    const TensorMap& t = c.map;
    if (t.rank < 1 || t.rank > 5 || (t.elem_bytes != 2 && t.elem_bytes != 4)) fail("cp.async.bulk.tensor: not a tensor map");
    if (t.rank != 3) fail("cp.async.bulk.tensor.3d: the map's rank is not 3");
    // Alignment within the block's shared window (smem_u32's offsets, as wgmma's descriptors see it).
    const long long at = (const char*)dst - blk->dynamic_shared.data();
    if (at < 0 || (size_t)at >= blk->dynamic_shared.size()) fail("cp.async.bulk.tensor: the destination is not dynamic shared memory");
    if (t.swizzle == 128 && (at % 1024 || t.box[0] * t.elem_bytes > 128))
        fail("cp.async.bulk.tensor: the 128-byte swizzle needs a 1024-byte aligned tile of rows up to 128 bytes");
    if (at % 128) fail("cp.async.bulk.tensor: shared memory not 128-byte aligned");
    uint64_t box_bytes = t.elem_bytes;
    for (unsigned i = 0; i < t.rank; i++) box_bytes *= t.box[i];
    if ((size_t)at + box_bytes > blk->dynamic_shared.size()) fail("cp.async.bulk.tensor: the box runs past the block's shared memory");
    mbar_of(bar).copies.push_back(c);
}

inline void mbar_wait(const void* bar, unsigned parity) {
    for (;;) {
        Mbar& m = mbar_of(bar);
        for (const TmaCopy& c : m.copies) {
            tma_land(c);
            uint64_t n = c.map.elem_bytes;
            for (unsigned i = 0; i < c.map.rank; i++) n *= c.map.box[i];
            m.tx -= (long long)n;
        }
        m.copies.clear();
        for (const std::vector<Copy>& copies : m.async_arrivals) {
            for (const Copy& c : copies) land(c);
            if (m.pending == 0) fail("mbarrier: more arrivals than its count (cp.async.mbarrier.arrive.noinc)");
            m.pending--;
            mbar_settle(m);
        }
        m.async_arrivals.clear();
        mbar_settle(m);
        if ((m.phase & 1) != parity) {
            blk->stalls = 0;
            return;
        }
        if (++blk->stalls > 4 * blk->fibers.size() + 64) fail("deadlock: threads wait on an mbarrier phase that can never complete");
        yield();
    }
}

// ---- wgmma (sm_90a): warpgroup-wide asynchronous matrix multiply ----
//
// A warpgroup is 4 consecutive warps (threads 128 w .. 128 w + 127). Its .sync.aligned instructions
// are collective: every thread of it arrives before any goes on. Modelled: wgmma.mma_async
// m64nNk16 with f32 accumulators and f16/bf16 operands, A from shared memory (K-major) or registers,
// B from shared memory (K-major, or N-major with imm-trans-b); the matrix descriptors with the
// 128-byte swizzle (the only mode the kernels use: any other faults); commit_group and wait_group,
// operands read and accumulators written only at the wait. Not modelled: wgmma.fence (a register
// written between the issue and the wait is caught, as the wait overwrites it; a missing fence before
// the first issue is not) and the async proxy fence (a no-op here).

inline Warpgroup& my_warpgroup(unsigned* thread = nullptr) {
    const unsigned t = blk->current;
    if (blk->fibers.size() % 128) fail("a warpgroup instruction in a block whose size is not a multiple of 128");
    if (thread) *thread = t % 128;
    return blk->warpgroups[t / 128];
}

// Waits until all 128 threads of this thread's warpgroup have arrived.
inline void syncwarpgroup() {
    unsigned t;
    Warpgroup& g = my_warpgroup(&t);
    const unsigned first = blk->current - t;
    for (unsigned i = first; i < first + 128; i++)
        if (blk->fibers[i].done) fail("a warpgroup-wide instruction with threads that have exited");
    arrive(g.barrier, 128);
}

// As `exchange`, over the warpgroup: `read` (on thread 0 of it alone) gets every thread's operand.
template <class T, class F>
inline void wg_exchange(const T& mine, F read) {
    unsigned t;
    my_warpgroup(&t);
    const unsigned first = blk->current - t;
    blk->slots[blk->current] = &mine;
    syncwarpgroup();
    if (t == 0) {
        const void* const* base = &blk->slots[first];
        read([base](unsigned i) -> const T& { return *static_cast<const T*>(base[i]); });
    }
    syncwarpgroup();
}

// The byte offset in shared memory (the dynamic shared memory starts at 0 here) of element (row, col)
// of a matrix described by `desc`: K-major, rows are M or N (8-row groups `SBO` apart, rows of 128
// bytes) and cols K; N-major (`mn_major`), rows are K (8-row groups SBO apart, rows of 128 bytes)
// and cols N (64-element blocks `LBO` apart). Then the 128-byte swizzle: bits 7-9 of the address
// into bits 4-6.
inline uint64_t desc_addr(uint64_t desc, bool mn_major, unsigned row, unsigned col) {
    if ((desc >> 62) != 1) fail("wgmma: a matrix descriptor without the 128-byte swizzle (the only mode modelled)");
    if ((desc >> 49) & 7) fail("wgmma: a matrix descriptor with a base offset (tiles are 1024-byte aligned)");
    const uint64_t start = (desc & 0x3fff) << 4, lbo = ((desc >> 16) & 0x3fff) << 4, sbo = ((desc >> 32) & 0x3fff) << 4;
    const uint64_t a = mn_major ? start + (col / 64) * lbo + (row / 8) * sbo + (row % 8) * 128 + (col % 64) * 2
                                : start + (row / 8) * sbo + (row % 8) * 128 + col * 2;
    return a ^ ((a >> 3) & 0x70);
}

inline uint16_t smem_u16(uint64_t offset) {
    if (offset + 2 > blk->dynamic_shared.size()) fail("wgmma: a descriptor reaches past the block's shared memory");
    uint16_t v;
    std::memcpy(&v, blk->dynamic_shared.data() + offset, 2);
    return v;
}

inline void wgmma_run(const WgmmaOp& op) {
    // A (64 x 16): registers in mma.sync's layout per warp (warp w: rows 16 w ..), or shared memory.
    auto A = [&](unsigned m, unsigned k) -> float {
        if (op.a_in_regs) {
            const unsigned owner = (m / 16) * 32 + (m % 8) * 4 + (k % 8) / 2, reg = (m % 16) / 8 + 2 * (k / 8);
            const uint32_t w = op.a[owner][reg];
            return half_to_f32((uint16_t)(k % 2 ? w >> 16 : w), op.bf16);
        }
        return half_to_f32(smem_u16(desc_addr(op.desc_a, false, m, k)), op.bf16);
    };
    std::vector<float> b(16 * op.n);
    for (unsigned k = 0; k < 16; k++)
        for (unsigned n = 0; n < op.n; n++)
            b[k * op.n + n] = half_to_f32(smem_u16(op.tnsp_b ? desc_addr(op.desc_b, true, k, n) : desc_addr(op.desc_b, false, n, k)), op.bf16);
    for (unsigned m = 0; m < 64; m++) {
        float a[16];
        for (unsigned k = 0; k < 16; k++) a[k] = A(m, k);
        for (unsigned n = 0; n < op.n; n++) {
            // D (64 x N): thread (m / 16) 32 + (m % 8) 4 + (n % 8) / 2, element 4 (n / 8) + 2 ((m % 16) / 8) + n % 2.
            float& d = op.d[(m / 16) * 32 + (m % 8) * 4 + (n % 8) / 2][4 * (n / 8) + 2 * ((m % 16) / 8) + n % 2];
            float acc = op.scale_d ? d : 0.0f;
            for (unsigned k = 0; k < 16; k++) acc += a[k] * b[k * op.n + n];
            d = acc;
        }
    }
}

// wgmma.mma_async.sync.aligned.m64n<n>k16.f32.<bf16|f16> d, a (descriptor or registers), b-desc,
// scale-d, 1, 1, (trans-a 0,) trans-b.
inline void wgmma(float* d, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, unsigned n, int scale_d, bool tnsp_b, bool bf16) {
    struct Mine {
        float* d;
        const uint32_t* a;
        uint64_t desc_a, desc_b;
        unsigned n;
        int scale_d;
        bool tnsp_b, bf16;
    } mine{d, a_regs, desc_a, desc_b, n, scale_d, tnsp_b, bf16};
    Warpgroup& g = my_warpgroup();
    wg_exchange(mine, [&](auto at) {
        WgmmaOp op{};
        op.n = n;
        op.bf16 = bf16;
        op.a_in_regs = a_regs != nullptr;
        op.tnsp_b = tnsp_b;
        op.scale_d = scale_d;
        op.desc_a = desc_a;
        op.desc_b = desc_b;
        for (unsigned i = 0; i < 128; i++) {
            const Mine& o = at(i);
            if (o.n != n || o.bf16 != bf16 || (o.a != nullptr) != op.a_in_regs || o.tnsp_b != tnsp_b || o.scale_d != scale_d ||
                o.desc_b != desc_b || (!op.a_in_regs && o.desc_a != desc_a))
                fail("wgmma: the warpgroup's threads disagree on the instruction or its descriptors");
            op.d[i] = o.d;
            op.a[i] = o.a;
        }
        g.open.push_back(op);
    });
}

inline void wgmma_commit() {
    unsigned t;
    Warpgroup& g = my_warpgroup(&t);
    syncwarpgroup();
    if (t == 0) {
        g.groups.push_back(std::move(g.open));
        g.open.clear();
    }
    syncwarpgroup();
}

inline void wgmma_wait(unsigned pending) {
    unsigned t;
    Warpgroup& g = my_warpgroup(&t);
    syncwarpgroup();
    if (t == 0)
        while (g.groups.size() > pending) {
            for (const WgmmaOp& op : g.groups.front()) wgmma_run(op);
            g.groups.erase(g.groups.begin());
        }
    syncwarpgroup();
}

// ---- launching ----

inline void trampoline() {
    (*blk->body)();
    Fiber& f = me();
    if (!f.open.empty() || !f.groups.empty()) cp_async_wait(0);
    if (blk->fibers.size() % 128 == 0) {
        Warpgroup& g = blk->warpgroups[blk->current / 128];
        if (!g.open.empty() || !g.groups.empty()) fail("a thread exited with wgmma operations it never waited for");
    }
    f.done = true;
    blk->live--;
    blk->stalls = 0;
    // A block barrier counts the threads still running (as the hardware treats exited threads).
    if (blk->block_barrier.arrived && blk->block_barrier.arrived == blk->live) {
        blk->block_barrier.arrived = 0;
        blk->block_barrier.generation++;
    }
    yield();  // never resumed
    std::abort();
}

inline void run_block(Block& b, std::vector<std::vector<char>>& stacks) {
    const unsigned n = b.bdim.x * b.bdim.y * b.bdim.z;
    b.fibers.assign(n, Fiber{});
    b.warp_barriers.assign((n + 31) / 32, Barrier{});
    b.warpgroups.assign((n + 127) / 128, Warpgroup{});
    b.slots.assign(((n + 31) / 32) * 32, nullptr);
    b.live = n;
    b.block_barrier = Barrier{};
    for (Barrier& nb : b.named) nb = Barrier{};
    b.mbars.clear();
    if (stacks.size() < n) stacks.resize(n, std::vector<char>(256 << 10));
    for (unsigned i = 0; i < n; i++) {
        Fiber& f = b.fibers[i];
        f.tid = {i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y)};
        f.lane = i % 32;
        f.warp = i / 32;
#ifdef EMU_FAST_SWITCH
        // The stack as emu_switch leaves it: six saved registers, then the address it returns to
        // (trampoline, entered with the stack aligned as after a call).
        uintptr_t top = ((uintptr_t)stacks[i].data() + stacks[i].size()) & ~(uintptr_t)15;
        void** sp = (void**)top;
        *--sp = nullptr;  // trampoline's return address: it never returns
        *--sp = (void*)&trampoline;
        for (int r = 0; r < 6; r++) *--sp = nullptr;
        f.sp = sp;
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[i].data();
        f.ctx.uc_stack.ss_size = stacks[i].size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, trampoline, 0);
#endif
    }
    blk = &b;
    b.aborted = false;
    while (b.live && !b.aborted) {
        for (unsigned i = 0; i < n; i++) {
            if (b.fibers[i].done) continue;
            b.current = i;
#ifdef EMU_FAST_SWITCH
            emu_switch(&b.scheduler_sp, b.fibers[i].sp);
#else
            swapcontext(&b.scheduler, &b.fibers[i].ctx);
#endif
        }
    }
    if (b.pdl && !b.aborted)
        for (unsigned i = 0; i < n; i++)
            if (!b.fibers[i].pdl_waited) {
                char what[160];
                std::snprintf(what, sizeof what,
                              "launched as a programmatic dependent, but thread %u of block %u,%u,%u never executed griddepcontrol.wait",
                              i, b.bid.x, b.bid.y, b.bid.z);
                record_fault(what);
                break;
            }
    blk = nullptr;
}

// Runs `body` (the kernel call) over the grid, blocks spread over the machine's threads. False on a
// fault (`fault` says which; blocks not yet started are not run).
inline bool launch(emu_dim3 grid, emu_dim3 block, size_t dynamic_shared, const std::function<void()>& body, bool pdl = false) {
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    std::atomic<unsigned long long> next{0};
    const unsigned workers = std::max(1u, std::min<unsigned>(std::thread::hardware_concurrency(), (unsigned)std::min<unsigned long long>(blocks, 64)));
    auto work = [&] {
        std::vector<std::vector<char>> stacks;
        Block b;
        b.bdim = block;
        b.gdim = grid;
        b.body = &body;
        b.pdl = pdl;
        b.dynamic_shared.assign(dynamic_shared, 0);
        for (unsigned long long id; !failed && (id = next++) < blocks;) {
            b.bid = {(unsigned)(id % grid.x), (unsigned)(id / grid.x % grid.y), (unsigned)(id / ((unsigned long long)grid.x * grid.y))};
            run_block(b, stacks);
        }
    };
    failed = false;
    std::vector<std::thread> threads;
    for (unsigned w = 1; w < workers; w++) threads.emplace_back(work);
    work();
    for (auto& t : threads) t.join();
    if (failed) std::fprintf(stderr, "emu: %s\n", fault.c_str());
    return !failed;
}

// ---- running kernels by name: kernels/emu builds each kernel file with a table of its entries ----

using Entry = void (*)(void**);

inline std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> r;
    return r;
}

struct Register {
    Register(std::initializer_list<std::pair<const char*, Entry>> entries) {
        for (auto& e : entries) registry()[e.first] = e.second;
    }
};

// A kernel argument from the address cuLaunchKernel would read it at: device pointers are 64-bit.
template <class A>
inline A arg(void* p) {
    if constexpr (std::is_pointer_v<A>) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        return (A)(uintptr_t)v;
    } else {
        A v;
        std::memcpy(&v, p, sizeof(A));
        return v;
    }
}

template <class... A, size_t... I>
inline void call_with(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(arg<A>(p[I])...);
}

template <class... A>
inline void call(void (*f)(A...), void** p) {
    call_with(f, p, std::index_sequence_for<A...>{});
}

}  // namespace emu

#define threadIdx (emu::me().tid)
#define blockIdx (emu::blk->bid)
#define blockDim (emu::blk->bdim)
#define gridDim (emu::blk->gdim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shfl_xor(v, mask); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src) { return emu::shfl(v, src); }
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta) { return emu::shfl_up(v, delta); }
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned out = 0;
    const int mine = pred != 0;
    emu::exchange(mine, [&](auto at) {
        for (unsigned l = 0; l < 32; l++) out |= (unsigned)at(l) << l;
    });
    return out;
}
inline int __ffs(int x) { return __builtin_ffs(x); }

// Blocks run on several OS threads at once: global atomics are real ones.
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicMin(unsigned* p, unsigned v) {
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
// __threadfence: this thread's writes before it are seen by any thread that sees its writes after
// it (here between the OS threads that run blocks). __ldcg: a load past L1 (no such cache here).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T>
inline T __ldcg(const T* p) { return *p; }
// Floating-point adds by compare-and-swap, as the hardware's are atomic.
template <class F>
inline F atomic_add_float(F* p, F v) {
    F old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    F want;
    do want = old + v;
    while (!__atomic_compare_exchange(p, &old, &want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
inline float atomicAdd(float* p, float v) { return atomic_add_float(p, v); }
inline double atomicAdd(double* p, double v) { return atomic_add_float(p, v); }

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
using std::exp2f;
using std::fmaxf;
using std::fminf;
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
