"""`python -m tests.straggler_main --config X ...`: pipeline.train with a planted straggler, for tests.

STRAGGLER_RANK=r STRAGGLER_SLEEP_S=s: rank r sleeps s seconds inside every transformer block's forward of every
training step (a slow GPU, simulated), through a global module hook; the trainer itself is unchanged."""
import os
import time

import torch

from pipeline.model import Block
from pipeline.train import main


def _slow_block(module, args):
    if isinstance(module, Block) and module.training:  # training forwards only, not evaluation
        time.sleep(float(os.environ["STRAGGLER_SLEEP_S"]))


if __name__ == "__main__":
    if os.environ.get("RANK") == os.environ.get("STRAGGLER_RANK"):
        torch.nn.modules.module.register_module_forward_pre_hook(_slow_block)
    main()
