"""Plan a run before renting GPUs: per-device memory at each peak, a verdict with the setting to change,
time per RL step, and where the rollout engines go (``qwenlong plan --config FILE --gpus N``).

Pure arithmetic on the config and the model's shape: imports neither torch nor the kernels (their
tile sizes are read from source, :mod:`.kernel_sizes`), so it answers in a fraction of a second.
"""

from qwenlong.plan.models import KNOWN_MODELS, ModelShape, model_shape
from qwenlong.plan.placement import RolloutPlacement, rollout_placement
from qwenlong.plan.report import Plan, Problem, format_plan, make_plan

__all__ = ["KNOWN_MODELS", "ModelShape", "Plan", "Problem", "RolloutPlacement", "format_plan", "make_plan",
           "model_shape", "rollout_placement"]
