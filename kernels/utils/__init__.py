"""Small helpers shared by the kernels: argument checks and the interpreter bf16 fix."""
