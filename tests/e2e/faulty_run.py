"""A user's launcher for a task defined outside asyncflow:

    torchrun --nproc_per_node=2 -m tests.e2e.faulty_run task=faulty_addition [overrides]
"""

import sys

from asyncflow.tasks import register_task
from asyncflow.train import main
from tests.faulty_tasks import FaultyAdditionConfig, FaultyAdditionTask

if __name__ == "__main__":
    register_task("faulty_addition", FaultyAdditionConfig, FaultyAdditionTask)
    sys.exit(main())
