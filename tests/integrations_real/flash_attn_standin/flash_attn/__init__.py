"""An import stand-in for flash-attn (a CUDA-only package) where OpenRLHF imports it at module load.

``openrlhf.models.ring_attn_utils`` imports ``flash_attn.bert_padding`` and
``flash_attn.utils.distributed`` at the top, so ``openrlhf.models.Actor`` cannot be imported
without them. These are the few plain-PyTorch helpers it takes from there, written out for the
CPU test venv; there is no attention kernel here (``flash_attn.ops`` and the attention functions
are absent, so OpenRLHF's ``try: import`` of them falls back to PyTorch as without flash-attn).
tests/integrations_real/conftest.py puts this folder on ``sys.path`` only when OpenRLHF is
installed and flash-attn is not.
"""

__version__ = "0.0.0+qwenlong-standin"
