// What the checks run through the CPU model share: a seeded generator and rounding to f16/bf16.
#pragma once
#include "simt.hpp"

namespace check {

inline uint64_t rng = 0x9e3779b97f4a7c15ull;

// Uniform in [-1, 1) (xorshift64).
inline double uniform() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / (double)(1ull << 52) - 1.0;
}

inline unsigned short to_half(double x, bool bf16) { return bf16 ? emu::f32_to_bf16((float)x) : emu::f32_to_f16((float)x); }
inline double from_half(unsigned short h, bool bf16) { return emu::half_to_f32(h, bf16); }
inline double round_to(double x, bool bf16) { return from_half(to_half(x, bf16), bf16); }

}  // namespace check

// Runs a launch; on a fault (the model's report of what a GPU would fault on) the case fails.
#define CHECK_LAUNCH(...)                                              \
    if (!emu::launch(__VA_ARGS__)) {                                   \
        std::printf("FAIL the launch faulted: %s\n", emu::fault.c_str()); \
        return false;                                                  \
    }
