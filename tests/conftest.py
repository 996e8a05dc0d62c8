import os
import re

# Set before torch or any HF library is imported by a test module.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """A test that takes `device` runs on CPU, and on CUDA too when `-m gpu` selects it. Without
    CUDA a CUDA variant fails if gpu tests were asked for (`-m gpu`), and is skipped if it was
    selected by another mark (`-m slow` also selects the slow tests' CUDA variants)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        markexpr = request.config.getoption("markexpr") or ""
        if re.search(r"(?<!not )\bgpu\b", markexpr):
            pytest.fail("selected with -m gpu but torch.cuda.is_available() is False")
        pytest.skip("CUDA variant; no CUDA device here")
    return request.param
