"""The package as a user installs it: `maturin build` makes a wheel that
holds the Python sources and the compiled core, and that wheel, installed on
its own (not the development install of .venv), records and answers.

The wheel is built with the dev profile so that it reuses the test build
(`maturin build --release`, what the README gives users, differs only in
the optimisation level; scripts/bench.sh builds that one)."""
import os
import subprocess
import sys
import zipfile

from kit import ROOT

SCRIPT = r"""
import sys
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import reptrace

assert reptrace.__file__.startswith(sys.argv[2]), reptrace.__file__
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.rand(32, 4), (torch.rand(32) > 0.5).long()
tracer = reptrace.Tracer(model, opt, sys.argv[1], classes=["a", "b"])
for i in range(0, 32, 8):
    opt.zero_grad()
    loss = F.cross_entropy(model(x[i:i + 8]), y[i:i + 8])
    loss.backward()
    tracer.step(loss, np.arange(i, i + 8), y[i:i + 8])
tracer.finish(probes=(x[:2], y[:2], [100, 101]))
run = reptrace.open(sys.argv[1])
run.attribute(probes=[100])
print(run.sql("SELECT COUNT(*) AS n FROM contributions").to_pylist()[0]["n"])
"""


def test_the_wheel_installs_on_its_own_and_works(tmp_path):
    wheels = tmp_path / "wheels"
    env = {**os.environ, "VIRTUAL_ENV": str(ROOT / ".venv")}
    build = subprocess.run(
        [str(ROOT / ".venv/bin/maturin"), "build", "--profile", "dev", "--locked", "--quiet",
         "--out", str(wheels)],
        cwd=ROOT / "python", capture_output=True, text=True, env=env,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("reptrace-*.whl")
    assert "abi3" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for part in ("reptrace/__init__.py", "reptrace/_torch.py", "reptrace/_run.py"):
        assert part in names, (part, names)
    assert any(n.startswith("reptrace/_reptrace") and n.endswith(".so") for n in names), names

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr
    # Run from an empty directory, with the installed wheel first on the path.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run"), str(site)],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) > 0
