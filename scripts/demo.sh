#!/usr/bin/env bash
# The demo: trains a small network on the bundled digits data with tracing,
# attributes the test probes and prints what shaped one of them.
# Does its own set-up on a fresh machine (PyTorch 2.11.0 into .venv).
#
#   scripts/demo.sh [reptrace demo options…]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --torch
# Its own build profile (Cargo.toml, profile.demo): a fresh clone compiles
# in a few minutes; the binaries are target/demo/reptrace (the analysis
# commands, no libtorch) and target/demo/reptrace-torch (train, demo, probe;
# `reptrace demo` runs it).
cargo build --locked --profile demo -p reptrace-cli --bins
exec target/demo/reptrace demo "$@"
