"""Which devices and process-group backends a run's config selects."""

import pytest
import torch

from asyncflow.launch.placement import sync_backend, train_device_type


@pytest.mark.parametrize("train, engine, backend", [
    ("cuda:0", "cuda", "nccl"),
    ("cuda:1", "cuda:1", "nccl"),
    ("cuda:0", "cpu", "gloo"),  # the engine receives CPU tensors
    ("cpu", "cuda", "gloo"),    # the trainer sends CPU tensors
    ("cpu", "cpu", "gloo"),
])
def test_weights_travel_over_nccl_only_when_both_ends_are_on_cuda(train, engine, backend):
    assert sync_backend(torch.device(train), engine) == backend


def test_the_train_device_follows_the_setting_and_cuda_needs_a_gpu():
    assert train_device_type("cpu") == "cpu"
    assert train_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert train_device_type("cuda") == "cuda"
    else:
        with pytest.raises(ValueError, match="trainer.device=cuda: no CUDA device"):
            train_device_type("cuda")
