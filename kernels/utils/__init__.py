"""Small helpers shared by the kernels: argument checks and the interpreter bf16 fix.

Every kernel module imports this package, so the bf16 fix is installed here whenever the kernels
are being defined for Triton's CPU interpreter (``TRITON_INTERPRET=1``): any process that runs
our kernels under the interpreter computes bf16 correctly, not only the test suite.
"""

from .interpreter import install_bf16_fix_when_interpreting

install_bf16_fix_when_interpreting()
