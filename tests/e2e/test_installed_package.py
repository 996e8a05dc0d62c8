"""A non-editable install finds its packaged configs: wheel built from the repository, installed
into a directory of its own, run under torchrun from outside the repository (the install comes
first on sys.path, ahead of the development checkout's editable one)."""

import os
import subprocess
import sys

from .conftest import REPO


def test_an_installed_wheel_runs_with_its_packaged_configs(tmp_path):
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("asyncflow-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert (site / "asyncflow" / "conf" / "config.yaml").is_file()
    assert (site / "asyncflow" / "conf" / "experiment" / "smollm2_math.yaml").is_file()
    assert (site / "bin" / "asyncflow-train").is_file()  # the console script
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "ASYNCFLOW_CACHE": str(REPO / ".cache")}  # the tiny model
    where = subprocess.run([sys.executable, "-c", "import asyncflow; print(asyncflow.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site)), where.stdout
    out = subprocess.run([sys.executable, "-m", "asyncflow.launch", "run.name=installed",
                          "pipeline.num_steps=2", "pipeline.eval_every=100",
                          "pipeline.eval_size=16"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "runs" / "installed" / "metrics.jsonl").is_file()
