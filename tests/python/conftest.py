"""Fixtures shared by the Python interoperability tests.

scripts/test.sh sets REPTRACE_BIN (the built `reptrace` binary),
REPTRACE_CARGO_TARGET (the cargo target dir) and optionally
REPTRACE_SYNTHETIC_BIN (the built `synthetic` example of reptrace-record).
Without them the fixtures fall back to the default debug build in target/.
"""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _target_dir() -> Path:
    return Path(os.environ.get("REPTRACE_CARGO_TARGET", ROOT / "target"))


def _binary(env_var: str, default: Path) -> Path:
    path = Path(os.environ.get(env_var, default))
    if not path.is_file():
        pytest.fail(
            f"{path} not found: build it first (cargo build; cargo build -p "
            f"reptrace-record --example synthetic) or set {env_var}"
        )
    return path


@pytest.fixture(scope="session")
def reptrace_bin() -> Path:
    """Path of the `reptrace` binary."""
    return _binary("REPTRACE_BIN", _target_dir() / "debug" / "reptrace")


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    """A run written by the recorder's `synthetic` example into a temp dir."""
    exe = _binary(
        "REPTRACE_SYNTHETIC_BIN", _target_dir() / "debug" / "examples" / "synthetic"
    )
    run = tmp_path_factory.mktemp("synthetic") / "run"
    subprocess.run([str(exe), str(run)], check=True, capture_output=True)
    return run
