"""Cache kernels: Triton kernels, their torch references, and one dispatch point."""
