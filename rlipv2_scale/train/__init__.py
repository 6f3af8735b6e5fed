"""Training: the Accelerate + DeepSpeed engine, optimiser groups and schedules, checkpoints,
telemetry, the evaluation hook, run configs and launching (see `engine.py`)."""
import os

import torch

# DeepSpeed picks its accelerator once, at its first lookup (which some imports trigger): on a
# machine without CUDA it must be the CPU one, with gloo.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
