import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, overrides: list[str], timeout_s: float = 600,
             extra_args: list[str] | None = None,
             module: str = "asyncflow.train") -> subprocess.CompletedProcess:
    """Launch `torchrun -m <module>` like a user would; returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", *(extra_args or []),
           "-m", module, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
