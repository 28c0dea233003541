"""Run the CUDA kernels of `kernels/` on the CPU: a host build plus fibers for CUDA threads."""
