"""reptrace: explain a trained network by tracing its training.

Record a PyTorch training loop with :class:`Tracer` (every step, every traced
layer, every training instance's exact share of the weight update, written to
Parquet by the Rust recorder), then ask questions of the run with
:func:`open` (SQL, canned queries, attribution, verification, reports), with
the same engine as the ``reptrace`` command line.

The method, the formulas and the trace format: docs/method.md, docs/format.md
and docs/python.md in the repository.
"""
from ._reptrace import (
    FORMAT_VERSION,
    AnalysisError,
    Error,
    InvalidInput,
    RecordError,
)
from ._reptrace import compact as _compact
from ._run import Run, open


def compact(run_dir, *, zstd_level: int = 1) -> dict:
    """Rewrites the part files of a run recorded with ``compression="none"``
    in the storage encoding (zstd), as one crash-safe commit; files already
    compressed are left alone. Refused while the run is being recorded.
    Returns what it did: ``files``, ``bytes_before``, ``bytes_after``,
    ``leftovers_removed`` and ``seconds``."""
    import os

    return _compact(os.fspath(run_dir), zstd_level)


__all__ = [
    "FORMAT_VERSION",
    "AnalysisError",
    "Error",
    "InvalidInput",
    "RecordError",
    "Run",
    "Tracer",
    "add_probes",
    "compact",
    "open",
]


def __getattr__(name):
    # Tracer and add_probes need PyTorch; importing reptrace for analysis alone does not.
    if name == "Tracer":
        from ._torch import Tracer

        return Tracer
    if name == "add_probes":
        from ._torch import add_probes

        return add_probes
    raise AttributeError(f"module 'reptrace' has no attribute {name!r}")
