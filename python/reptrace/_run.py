"""A recorded run, analysed with the Rust analyzer (the CLI's engine)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

from . import _reptrace


def open(path: str | os.PathLike) -> "Run":  # noqa: A001 - reptrace.open reads as intended
    """Opens a run directory (any reptrace run: recorded from PyTorch, by
    ``reptrace train`` or by any other producer)."""
    return Run(path)


class Run:
    """A run directory. Every method is one of the CLI's commands."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        # Reads (and checks) the manifest now, so a bad path fails here.
        self._manifest = json.loads(_reptrace.manifest(str(self.path)))

    def __repr__(self) -> str:
        m = self._manifest
        return (
            f"reptrace.Run({str(self.path)!r}, status={m['status']!r}, "
            f"mode={m['mode']!r}, layers={self.layers!r})"
        )

    @property
    def manifest(self) -> dict:
        """The manifest (``manifest.json``) as a dict, as read now."""
        self._manifest = json.loads(_reptrace.manifest(str(self.path)))
        return self._manifest

    @property
    def layers(self) -> list[str]:
        """The traced layers, in the manifest's order."""
        return [
            m["name"]
            for m in self._manifest["model"]["modules"]
            if m.get("kind") in ("linear", "conv2d") and m.get("traced")
        ]

    def info(self) -> dict:
        """Status, last step, mode and the committed rows per table and layer.

        ``state`` says whether the run is still being recorded: ``"recording"``
        (a live recorder holds its lock), ``"killed"`` (status recording, but
        its recorder died: readable up to its last commit), ``"complete"`` or
        ``"aborted"``; ``locked`` whether a live recorder holds the lock;
        ``storage`` per traced layer its kind, whether its records hold
        factors or full updates, and the committed ``updates`` records and
        bytes (``bytes_per_record``: per example and step in instance
        mode)."""
        m = self.manifest
        rows: dict[str, dict[str, int]] = {}
        files = [f for c in m["commits"] for f in c["files"]]
        for a in m.get("attributions", []) + [m.get("attribution") or {}]:
            files += a.get("files", [])
        for f in files:
            per = rows.setdefault(f["table"], {})
            key = f.get("layer") or ""
            per[key] = per.get(key, 0) + f["rows"]
        steps = [c["step"] for c in m["commits"] if c.get("step") is not None]
        locked = _reptrace.lock_held(str(self.path))
        storage = {}
        for spec in m["model"]["modules"]:
            if not spec.get("traced"):
                continue
            whole = m["mode"] == "batch" or _reptrace.record_storage(json.dumps(spec)) == "full"
            mine = [f for c in m["commits"] for f in c["files"]
                    if f["table"] == "updates" and f.get("layer") == spec["name"]]
            records = sum(f["rows"] for f in mine)
            size = sum(f["bytes"] for f in mine)
            storage[spec["name"]] = {
                "kind": spec["kind"],
                "storage": "full" if whole else "factors",
                "records": records,
                "bytes": size,
                "bytes_per_record": size / records if records else None,
            }
        state = "killed" if m["status"] == "recording" and not locked else m["status"]
        return {
            "run": str(self.path),
            "status": m["status"],
            "state": state,
            "locked": locked,
            "mode": m["mode"],
            "dtype": m["dtype"],
            "format_version": m["format_version"],
            "last_step": max(steps) if steps else None,
            "layers": self.layers,
            "rows": rows,
            "storage": storage,
        }

    def sql(self, query: str) -> pa.Table:
        """Read-only SQL over the run's tables, as a ``pyarrow.Table``
        (``.to_pandas()`` for pandas)."""
        return pa.table(_reptrace.sql(str(self.path), query))

    def query(self, name: str, **params) -> pa.Table:
        """A canned query (``top_proponents``, ``class_shares``, …, see
        :attr:`queries`) or a ``.sql`` file, with its parameters as keyword
        arguments: ``run.query("top_proponents", probe=3, k=5)``."""
        values = {k: str(v) for k, v in params.items()}
        return pa.table(_reptrace.query(str(self.path), name, values))

    @property
    def queries(self) -> list[str]:
        """The names of the built-in canned queries."""
        return list(_reptrace.builtin_queries())

    def add_probes(self, model, inputs, labels, ids=None, *, train: bool = False,
                   batch_size: int = 256) -> list[int]:
        """Adds probes to this completed run: see :func:`reptrace.add_probes`
        (``model`` is the trained PyTorch model). Returns the probe ids."""
        from ._torch import add_probes

        out = add_probes(self.path, model, inputs, labels, ids, train=train,
                         batch_size=batch_size)
        self._manifest = json.loads(_reptrace.manifest(str(self.path)))
        return out

    def attribute(
        self,
        probes: str | list[int] = "test",
        layers: list[str] | None = None,
        steps: str | None = None,
        self_only: bool = False,
        by: str = "step",
    ) -> dict:
        """Materialises the contributions of the chosen probes (``"test"``,
        ``"train"``, ``"all"`` or a list of probe ids), as ``reptrace
        attribute`` does: per record (``by="step"``, table ``contributions``)
        or summed per instance (``"instance"``) or instance and epoch
        (``"epoch"``, table ``influence``). Queries do not need it (they
        compute contributions on demand); it is for engines that read the
        files. Returns a summary."""
        if not isinstance(probes, str):
            probes = "ids:" + ",".join(str(int(p)) for p in probes)
        return _reptrace.attribute(str(self.path), probes, layers, steps, self_only, by)

    def verify(self, tolerance: float = 1e-5) -> list[dict]:
        """Integrity and completeness checks, as ``reptrace verify``: a list
        of checks with ``status`` pass, warn, FAIL or skip."""
        return _reptrace.verify_run(str(self.path), tolerance)

    def report(self, probe: int, out: str | os.PathLike, k: int = 10) -> Path:
        """Writes the self-contained HTML report of ``probe`` to ``out``."""
        _reptrace.write_report(str(self.path), int(probe), str(out), int(k), None)
        return Path(out)
