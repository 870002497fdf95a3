// Stream timing. hold_stream keeps the stream busy for `ns` nanoseconds of the GPU's global timer,
// so that the host can queue a whole batch of launches behind it; the batch then runs back to back
// at the GPU's own pace and events around it measure GPU time without the host's launch overhead
// (`lookahead bench`'s "gpu ms"; the PyTorch baseline does the same with torch.cuda._sleep).
// Launch: one block of one thread.
#include "common.cuh"

#ifndef LOOKAHEAD_EMULATE
__device__ __forceinline__ u64 global_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#endif

extern "C" __global__ void hold_stream(u64 ns) {
#ifndef LOOKAHEAD_EMULATE  // the emulator has no clock to wait on, nor a host to hide
    const u64 start = global_ns();
    while (global_ns() - start < ns) __nanosleep(1000);
#endif
}
