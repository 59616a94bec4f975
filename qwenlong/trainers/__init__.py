"""Trainers: warm-up SFT and GRPO/DAPO phases on packed batches and the fused kernels.

The trainers only wire together the pure pieces: packing (``qwenlong.kernels`` packing and
``packed``), the fused losses (``qwenlong.kernels``), RL math (``qwenlong.algorithms``),
rewards, rollout engines and checkpoints.
"""

from qwenlong.trainers.grpo import GRPOTrainer
from qwenlong.trainers.packed import PackedBatch, forward_hidden, pack_sequences
from qwenlong.trainers.sft import SFTTrainer

__all__ = ["GRPOTrainer", "PackedBatch", "SFTTrainer", "forward_hidden", "pack_sequences"]
