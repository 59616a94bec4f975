"""Small helpers shared by the kernels: argument checks and the interpreter fixes.

Every kernel module imports this package, so the interpreter fixes are installed here whenever the kernels
are being defined for Triton's CPU interpreter (``TRITON_INTERPRET=1``): any process that runs
our kernels under the interpreter computes bf16 correctly, not only the test suite.
"""

from .interpreter import install_interpreter_fixes_when_interpreting

install_interpreter_fixes_when_interpreting()
