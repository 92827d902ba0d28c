import os
import subprocess
import sys

import pytest
import torch

from deploykit import zoo
from deploykit.data import DataSplit, load_dataset


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory):
    """The built-in networks as ONNX files, small inputs to keep the suite fast."""
    d = tmp_path_factory.mktemp("zoo")
    return {name: zoo.export_onnx(zoo.build(name, num_classes=10), (1, 3, 96, 96), d / f"{name}.onnx")
            for name in zoo.list_models()}


def run_cli(*args, cwd=None, timeout=300):
    """Run the real console entry point in a fresh process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "deploykit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def one_error_line(proc) -> str:
    """A user error: exit 2, exactly one non-empty line on stderr, no traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """Training-heavy tests: the machine's cores are shared with timing jobs, and one thread avoids waiting on a busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> DataSplit:
    """The built-in digits at 32x32, split with seed 0."""
    return load_dataset("digits", 32)
