// Empty: tests/cuda-emu/emu.h defines what the kernels use.
