"""Command start-up: a whole `reptrace query` process against the DuckDB
command line answering the same canned query in its own process, both timed
from outside (process start, opening the run, planning, the query, printing
the result, exit).

    .venv/bin/python scripts/bench/startup.py BIN RUN --probe P [--repeats N] [--duckdb EXE]

BIN is the `reptrace` binary, RUN a run whose probe P is materialised
(`reptrace attribute RUN --probes ids:P`), so that DuckDB reads the same
contribution rows. The DuckDB script (untimed to build) registers every
table of the run as a view over the committed files
(tests/python/snippets/duckdb_views.py) and runs the query file with its
parameters substituted. Per repeat the two commands run back to back
(one untimed run of each first); the ratio is the median of the per-repeat
ratios. One line per query: `BENCH startup name=NAME ratio=R
reptrace_s=S duckdb_s=S rows=R duckdb_rows=R repeats=N`, and one for
`reptrace --version` (`BENCH startup name=version ...`, no DuckDB).
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python" / "snippets"))

from duckdb_queries import declared_params, number  # noqa: E402
from duckdb_views import view_statements  # noqa: E402

QUERIES = {"top_proponents": {"k": 10}, "data_map": {}, "class_shares": {}}


def timed(cmd):
    start = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"startup.py: {' '.join(map(str, cmd[:3]))} … failed: {res.stderr.strip()}")
    return took, res.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bin", type=Path)
    ap.add_argument("run", type=Path)
    ap.add_argument("--probe", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--duckdb", default=str(ROOT / ".venv" / "bin" / "duckdb"))
    args = ap.parse_args()
    views = "".join(f"{v};\n" for v in view_statements(args.run))
    work = Path(tempfile.mkdtemp(prefix="reptrace-startup-"))
    print(f"start-up: whole processes, {args.bin} vs {args.duckdb}, {args.run}, probe {args.probe}, "
          f"median of {args.repeats}")
    print(f"{'query':<16} {'reptrace ms':>12} {'duckdb ms':>10} {'ratio':>7} {'rows':>6}")
    times = sorted(timed([str(args.bin), "--version"])[0] for _ in range(args.repeats))
    version_s = statistics.median(times)
    print(f"{'--version':<16} {version_s * 1e3:>12.1f}")
    print(f"BENCH startup name=version reptrace_s={version_s:.6f} repeats={args.repeats}")
    for name, chosen in QUERIES.items():
        text = (ROOT / "crates" / "analyze" / "queries" / f"{name}.sql").read_text()
        chosen = {"probe": args.probe, **chosen}
        values = {n: chosen.get(n, d) for n, d in declared_params(text).items()}
        values = {n: number(v) if isinstance(v, str) else v for n, v in values.items()}
        sql = text
        for key, value in values.items():
            sql = re.sub(rf"\${key}\b", str(value), sql)
        script = work / f"{name}.sql"
        script.write_text(views + sql.rstrip().rstrip(";") + ";\n")
        ours = [str(args.bin), "query", str(args.run), name, "--format", "csv"]
        ours += [a for k, v in values.items() for a in ("--param", f"{k}={v}")]
        theirs = [args.duckdb, "-csv", "-f", str(script)]
        # One untimed run of each (page cache), then back-to-back pairs.
        _, out_ours = timed(ours)
        _, out_theirs = timed(theirs)
        rows, duck_rows = len(out_ours.splitlines()) - 1, len(out_theirs.splitlines()) - 1
        pairs = [(timed(ours)[0], timed(theirs)[0]) for _ in range(args.repeats)]
        ratio = statistics.median(a / b for a, b in pairs)
        a, b = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"{name:<16} {a * 1e3:>12.1f} {b * 1e3:>10.1f} {ratio:>7.2f} {rows:>6}")
        print(f"BENCH startup name={name} ratio={ratio:.4f} reptrace_s={a:.6f} duckdb_s={b:.6f} "
              f"rows={rows} duckdb_rows={duck_rows} repeats={args.repeats}")


if __name__ == "__main__":
    main()
