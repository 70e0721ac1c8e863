// Runs one kernel of kernels/dpo_ops.cu on the CPU (emu.h) for tests/cuda_emulated.rs.
// stdin (little endian): u32 name length, name, u32 grid x, y, u32 block x, y, u32 argument
// count, then per argument u8 kind (0: buffer, 1: scalar), u64 byte length, bytes.
// stdout: every buffer after the run, in argument order, as u64 byte length and bytes.
// `registry.inc` (written by the test) lists the kernels as K(name).
#include <cstdio>
#include <iostream>
#include <iterator>

#include "emu.h"
#include "../../kernels/dpo_ops.cu"
#include "kernels.h"

static int fail(const std::string &why) {
    std::cerr << "cuda-emu: " << why << "\n";
    return 2;
}

int main() {
    std::freopen(nullptr, "rb", stdin);
    const std::string in((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    size_t at = 0;
    auto take = [&](void *dst, size_t n) {
        if (at + n > in.size()) throw std::runtime_error("truncated input");
        std::memcpy(dst, in.data() + at, n);
        at += n;
    };
    auto u32 = [&] {
        uint32_t v;
        take(&v, 4);
        return v;
    };
    try {
        std::string name(u32(), '\0');
        take(name.data(), name.size());
        dim3 grid, block;
        grid.x = u32();
        grid.y = u32();
        block.x = u32();
        block.y = u32();
        const auto it = registry.find(name);
        if (it == registry.end()) return fail("no kernel " + name + " in registry.inc");
        const Kernel &k = it->second;
        const uint32_t n = u32();
        if (n != k.params.size()) return fail(name + ": " + std::to_string(n) + " arguments for " + std::to_string(k.params.size()) + " parameters");
        // Scalars 8-byte aligned; buffers exactly their size (AddressSanitizer: one byte past the
        // end is an error, as an illegal address is on a GPU).
        std::vector<std::vector<uint64_t>> data(n);
        std::vector<std::unique_ptr<char[]>> buffers(n);
        std::vector<size_t> len(n);
        std::vector<void *> ptrs(n), args(n);
        for (uint32_t i = 0; i < n; ++i) {
            uint8_t kind;
            take(&kind, 1);
            uint64_t bytes;
            take(&bytes, 8);
            const bool buffer = kind == 0;
            if (buffer != k.params[i].first) return fail(name + ": argument " + std::to_string(i) + " kind");
            if (!buffer && bytes != k.params[i].second) return fail(name + ": argument " + std::to_string(i) + " size");
            len[i] = bytes;
            if (buffer) {
                if (bytes) buffers[i].reset(new char[bytes]), take(buffers[i].get(), bytes);
                ptrs[i] = buffers[i].get();
                args[i] = &ptrs[i];
            } else {
                data[i].assign(bytes / 8 + 1, 0);
                take(data[i].data(), bytes);
                args[i] = data[i].data();
            }
        }
        emu::launch(grid, block, [&] { k.call(args.data()); });
        for (uint32_t i = 0; i < n; ++i) {
            if (!k.params[i].first) continue;
            const uint64_t bytes = len[i];
            std::fwrite(&bytes, 8, 1, stdout);
            std::fwrite(buffers[i].get(), 1, bytes, stdout);
        }
    } catch (const std::exception &e) {
        return fail(e.what());
    }
    return 0;
}
