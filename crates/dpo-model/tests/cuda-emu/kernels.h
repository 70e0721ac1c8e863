// The kernels of kernels/dpo_ops.cu by name, callable with CUDA's launch arguments (an array of
// pointers to each argument's value, as cuLaunchKernel takes them): shared by the stand-alone
// emulator (main.cpp) and the emulated driver (fake/libcuda.cpp). Include after emu.h and the
// kernels; `registry.inc` lists the kernels as K(name).
#pragma once
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct Kernel {
    std::vector<std::pair<bool, size_t>> params;  // (is a pointer, size) of each parameter
    std::function<void(void **)> call;            // the kernel with its arguments at args[i]
};

template <typename... A, size_t... I>
void call_with(void (*f)(A...), void **args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A> *>(args[I])...);
}

template <typename... A> Kernel kernel(void (*f)(A...)) {
    return {{{std::is_pointer_v<A>, sizeof(A)}...},
            [f](void **args) { call_with(f, args, std::index_sequence_for<A...>{}); }};
}

#define K(name) {#name, kernel(name)},
static const std::map<std::string, Kernel> registry = {
#include "registry.inc"
};
#undef K
