"""Helpers of scripts/bench.sh and the one summary table of the benchmarks.

    summary.py rss LABEL... -- CMD ARGS...   run CMD, print its peak RSS as a BENCH line
    summary.py storage DATA DTYPE RUN_INFO_JSON
                                             bytes on disk / raw f32 of a run's updates
    summary.py derived RUN                   bytes of derived tables / bytes of the trace
    summary.py machine                       CPU model, cores and RAM from /proc
    summary.py exe BUILD_JSON NAME           path of bench NAME from cargo's JSON messages
    summary.py table LOG... [--md OUT]       the table from the BENCH lines of LOG...

Every benchmark prints machine-readable lines besides its own table:

    BENCH <part> key=value key=value ...

`table` reads them from the logs, prints one table (row | figure | goal |
met? | from what) and writes it as Markdown to OUT. A row whose lines are
missing is printed as "missing" and makes `table` exit with status 1, as
does a query whose row counts differ between the engines.
"""
import json
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

# Goals of the issue (docs/benchmarks.md).
OVERHEAD_GOAL = 1.10
F16_OVER_F32_GOAL = 0.9
EXAMPLES_GOAL = 1.02
# PyTorch's default threads (2 here) / one torch thread fewer than cores.
TORCH_OVERHEAD_GOAL = 1.5
TORCH_OVERHEAD_GOAL_FEWER = 1.25
STORAGE_GOAL = {"f32": 0.35, "f16": 0.20}
ATTRIBUTION_GOAL = 0.7
QUERY_GOAL = 1.0
# top_proponents of one probe computed on demand / a bare scan of the updates.
ON_DEMAND_GOAL = 1.5
# Bytes of derived tables after the demo / bytes of the trace (updates).
DERIVED_GOAL = 1.0
# A whole `reptrace query` process / the DuckDB command line, same query.
STARTUP_GOAL = 1.5
# Row 9: peak RSS of the 31 M-row sort under its memory limit / the limit.
SORT_RSS_GOAL = 1.3
CHECK_GOAL = 1.03
# Row 12: records × probes per second on Spark local[2] / DataFusion's.
SPARK_GOAL = 0.5
# "Flat": peak RSS at 10x the run length at most this times the 1x peak.
FLAT_GOAL = 1.2
QUERIES = [
    "class_shares", "class_shares_by_epoch", "cosine_histogram", "layer_summary",
    "self_influence", "top_opponents", "top_proponents", "top_steps", "batch_member_influence",
]


def bench_line(part, **fields):
    print("BENCH " + part + " " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def parse(lines):
    """{part: [ {key: value} ... ]} from BENCH lines."""
    out = defaultdict(list)
    for line in lines:
        if not line.startswith("BENCH "):
            continue
        part, *pairs = line.split()[1:]
        out[part].append(dict(p.split("=", 1) for p in pairs if "=" in p))
    return out


def cmd_rss(argv):
    """Runs the command after `--`; prints `BENCH rss <labels> max_rss_kb=… wall_s=…`."""
    sep = argv.index("--")
    labels, cmd = argv[:sep], argv[sep + 1:]
    start = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"rss: {' '.join(cmd)} failed with status {proc.returncode}")
    # ru_maxrss of the waited-for children: kilobytes on Linux. This process
    # has only the one child, so it is that command's peak (VmHWM).
    kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    fields = dict(label.split("=", 1) for label in labels)
    bench_line("rss", **fields, max_rss_kb=kb, wall_s=f"{wall:.2f}")


def cmd_storage(argv):
    """`reptrace info --json` of a run → bytes on disk / raw f32 bytes of its updates."""
    data, dtype, path = argv
    info = json.loads(Path(path).read_text())
    updates = [t for t in info["tables"] if t["table"] == "updates"]
    disk = sum(t["bytes"] for t in updates)
    raw = sum(t["raw_f32_bytes"] or 0 for t in updates)
    if info["dtype"] != dtype or raw == 0:
        sys.exit(f"storage: {path}: dtype {info['dtype']}, raw bytes {raw}: not a {dtype} run with updates")
    rows = sum(t["rows"] for t in updates)
    bench_line("storage", data=data, dtype=dtype, default="true", ratio=f"{disk / raw:.4f}",
               raw_bytes=raw, disk_bytes=disk, records=rows)


def cmd_derived(argv):
    """Bytes of the derived tables (contributions, influence: every file on
    disk under them, listed or not) / bytes of the trace (updates)."""
    run = Path(argv[0])
    manifest = json.loads((run / "manifest.json").read_text())
    trace = sum(f["bytes"] for c in manifest["commits"] for f in c["files"] if f["table"] == "updates")
    derived = sum(p.stat().st_size for d in ("contributions", "influence") if (run / d).exists()
                  for p in (run / d).rglob("*") if p.is_file())
    bench_line("derived", run=run.name, ratio=f"{derived / trace:.4f}", derived_bytes=derived,
               trace_bytes=trace, attributions=len(manifest.get("attributions", [])))


def cmd_exe(argv):
    """The executable of bench target NAME in `cargo build --message-format=json` output."""
    path, name = argv
    found = None
    for line in Path(path).read_text().splitlines():
        if not line.startswith("{"):
            continue
        m = json.loads(line)
        target = m.get("target", {})
        if m.get("reason") == "compiler-artifact" and "bench" in target.get("kind", []) \
                and target.get("name") == name and m.get("executable"):
            found = m["executable"]
    if not found:
        sys.exit(f"exe: no bench target {name} in {path}")
    print(found)


def machine():
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cores = sum(1 for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("processor"))
    mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return f"{cpu}, {cores} cores, {mem_kb / 1024 / 1024:.1f} GiB RAM, {platform.system()} {platform.release()}"


def fmt_ratio(x):
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def rows_from(b):
    """[(row, figure, goal, met, from)] and the names of missing rows."""
    rows, missing = [], []

    def add(row, value, goal_text, ok, detail):
        if value is None:
            rows.append((row, "—", goal_text, "missing", detail))
            missing.append(row)
        else:
            rows.append((row, value, goal_text, "yes" if ok else "**no**", detail))

    _recording_rows(b, add)
    _analysis_rows(b, add, missing)
    _rss_rows(b, add)
    _later_rows(b, add, missing)
    return rows, missing


def _recording_rows(b, add):
    """Rows 1, 1b and 2: recording overhead, the examples table, storage."""
    # 1. recording overhead
    over = {(r["dtype"], r.get("compression", "zstd")): r for r in b["overhead"]}
    for compression in ("zstd", "none"):
        for dtype in ("f32", "f16"):
            r = over.get((dtype, compression))
            row = f"1 overhead {dtype}" + (", compression none" if compression == "none" else "")
            if r:
                x = float(r["ratio"])
                add(row, fmt_ratio(x), f"≤ {OVERHEAD_GOAL:.2f}", x <= OVERHEAD_GOAL,
                    f"traced/untraced time, MLP 784-256-10, batch 64, synthetic, {r['steps']} steps, "
                    f"untraced {float(r['untraced_ms_per_step']):.2f} ms/step, loop only "
                    f"{float(r['loop_ratio']):.2f}; median of {r['repeats']}")
            else:
                add(row, None, f"≤ {OVERHEAD_GOAL:.2f}", False, "")
        r = next((r for r in b.get("f16_over_f32", []) if r["compression"] == compression), None)
        row = f"1c f16 time / f32 time, {compression}"
        if r:
            x = float(r["ratio"])
            add(row, fmt_ratio(x), f"≤ {F16_OVER_F32_GOAL:.2f}", x <= F16_OVER_F32_GOAL,
                f"traced f16 / traced f32, `reptrace train` loop, same MLP, {r['steps']} steps, loop only "
                f"{float(r['loop_ratio']):.2f}; median of {r['repeats']}")
        else:
            add(row, None, f"≤ {F16_OVER_F32_GOAL:.2f}", False, "")

    # 1b. the examples table's share of recording
    r = (b.get("examples") or [None])[0]
    if r:
        x = float(r["ratio"])
        add("1b examples table", fmt_ratio(x) if abs(x - 1) >= 0.01 else f"{x:.3f}",
            f"≤ {EXAMPLES_GOAL:.2f}", x <= EXAMPLES_GOAL,
            f"traced f32 with / without the examples table (per-example loss and prediction), "
            f"same MLP, {r['steps']} steps, loop only {float(r['loop_ratio']):.3f}; median of {r['repeats']}")
    else:
        add("1b examples table", None, f"≤ {EXAMPLES_GOAL:.2f}", False, "")

    # 2. storage
    for data in ("synthetic", "digits"):
        for dtype in ("f32", "f16"):
            r = next((r for r in b["storage"] if r["data"] == data and r["dtype"] == dtype
                      and r.get("default") == "true"), None)
            goal = STORAGE_GOAL[dtype]
            row = f"2 storage {data} {dtype}"
            if r:
                x = float(r["ratio"])
                what = (f"{r['steps']} steps, zstd {r['zstd']}, median of {r['repeats']}" if data == "synthetic"
                        else f"{r['records']} update records")
                add(row, f"{x:.3f}", f"≤ {goal:.2f}", x <= goal,
                    f"bytes on disk / raw f32 ({int(r['disk_bytes']) / 1e6:.1f} / {int(r['raw_bytes']) / 1e6:.1f} MB), {what}")
            else:
                add(row, None, f"≤ {goal:.2f}", False, "")

    # 2b. compaction of a run recorded without compression
    for r in b.get("compact", []):
        x = int(r["output_bytes"]) / max(1, int(r["zstd_bytes"]))
        # Footers and page boundaries may differ by a few KB.
        add(f"2b compaction {r['dtype']}", f"{x:.4f}", "≤ 1.01", x <= 1.01,
            f"compacted `updates` bytes / bytes recorded with zstd 1 ({int(r['output_bytes']) / 1e6:.1f} / "
            f"{int(r['zstd_bytes']) / 1e6:.1f} MB); compaction {float(r['seconds_per_gb']):.1f} s per GB "
            f"of uncompressed parts ({float(r['seconds']):.2f} s), {r['steps']} steps")
    writes = {(r["dtype"], r["compression"]): float(r["seconds"]) for r in b.get("write", [])}
    for compression in ("zstd1", "none"):
        f32, f16 = writes.get(("f32", compression)), writes.get(("f16", compression))
        if f32 and f16:
            add(f"2c writer f16 / f32, {compression}", fmt_ratio(f16 / f32), f"≤ {F16_OVER_F32_GOAL:.2f}",
                f16 / f32 <= F16_OVER_F32_GOAL,
                f"the recorder's writer alone (write bench), f16 {f16:.2f} s / f32 {f32:.2f} s for the same factors")


def _analysis_rows(b, add, missing):
    """Rows 3 and 4: attribution, and the queries against DuckDB."""
    # 3. attribution
    if not b["attribution"]:
        add("3 attribution", None, f"≥ {ATTRIBUTION_GOAL}", False, "")
    for r in b["attribution"]:
        x = float(r["ratio"])
        add(f"3 attribution {r['layer']}", fmt_ratio(x), f"≥ {ATTRIBUTION_GOAL}", x >= ATTRIBUTION_GOAL,
            f"{r['kind'].replace('_', ' ')}: {float(r['pairs_per_s']):.3g} records×probes/s; bare decode "
            f"{float(r['scan_s']):.3f} s / attribution {float(r['attr_s']):.3f} s, {r['records']} records × "
            f"{r['probes']} probes, median of {r['repeats']}")

    # 4. queries
    setup = next(iter(b["query-setup"]), {})
    df = {r["name"]: r for r in b["query"] if r["engine"] == "datafusion"}
    duck = {r["name"]: r for r in b["query"] if r["engine"] == "duckdb"}
    for name in QUERIES:
        row = f"4 query {name}"
        d, k = df.get(name), duck.get(name)
        if not (d and k):
            add(row, None, f"≤ {QUERY_GOAL:.1f}", False, "")
            continue
        x = float(d["median_s"]) / float(k["median_s"])
        same = d["rows"] == k["rows"]
        plan = f" (planning {float(d['plan_s']) * 1e3:.0f} ms)" if "plan_s" in d else ""
        detail = (f"DataFusion {float(d['median_s']) * 1e3:.0f} ms{plan} / DuckDB {float(k['median_s']) * 1e3:.0f} ms, "
                  f"{d['rows']} result rows" + ("" if same else f" vs DuckDB {k['rows']}: ROW COUNTS DIFFER")
                  + f", {int(setup.get('contributions', 0)) / 1e6:.1f} M contribution rows, probe "
                  f"{setup.get('probe', '?')}, median of {d['repeats']}")
        add(row, fmt_ratio(x), f"≤ {QUERY_GOAL:.1f}", x <= QUERY_GOAL and same, detail)
        if not same:
            missing.append(row + " (row counts differ)")


def _rss_rows(b, add):
    """Rows 5 and 6: peak RSS at 10x the run length, the Python package's overhead."""
    # 5. peak RSS, 10x / 1x run length
    rss = {(r["what"], r.get("scale")): r for r in b["rss"]}

    def flat(row, what, describe):
        """A peak-RSS row: the 10x run over the 1x run of `what`;
        `describe(one, ten, mib_one, mib_ten)` says what was measured."""
        one, ten = rss.get((what, "1")), rss.get((what, "10"))
        if one and ten:
            x = int(ten["max_rss_kb"]) / int(one["max_rss_kb"])
            mib = lambda r: f"{int(r['max_rss_kb']) / 1024:.0f} MiB"  # noqa: E731
            add(row, f"{x:.2f}", f"≤ {FLAT_GOAL} (flat)", x <= FLAT_GOAL, describe(one, ten, mib(one), mib(ten)))
        else:
            add(row, None, f"≤ {FLAT_GOAL} (flat)", False, "")

    for what, label in (("train", "recording (reptrace train)"), ("attribute", "attribution (reptrace attribute)"),
                        ("query", "top_proponents computed on demand (reptrace query)")):
        flat(f"5 peak RSS {what} 10×/1×", what, lambda one, ten, m1, m10, label=label:
             f"{label}, digits, all layers traced: {m10} at {ten['epochs']} epochs / "
             f"{m1} at {one['epochs']} epochs ({one.get('detail', '').replace('_', ' ')})")

    # 6. the Python package: PyTorch training traced / untraced, and its peak
    # RSS at 10x the steps
    for model, what in (("mlp", "MLP 784-256-10"), ("cnn", "CNN conv 1→8, conv 8→16 s2, linear 2304→10")):
        torch_over = {r["dtype"]: r for r in b["torch_overhead"] if r.get("model", "mlp") == model}
        fewer = [d for d in torch_over if "_threads" in d] or ["f32_threads"]
        for dtype in ["f32", "f16", "f32_none", "f16_none", "f32_kept", *fewer]:
            r = torch_over.get(dtype)
            label = (dtype.replace("_none", ", compression none").replace("_threads", ", threads ")
                     .replace("_kept", ", torch_threads=None"))
            row = f"6 PyTorch {model.upper()} overhead {label}"
            goal = TORCH_OVERHEAD_GOAL_FEWER if "_threads" in dtype else TORCH_OVERHEAD_GOAL
            if r:
                x = float(r["ratio"])
                add(row, fmt_ratio(x), f"≤ {goal:.2f}", x <= goal,
                    f"traced/untraced time, reptrace.Tracer, PyTorch {what}, batch 64, synthetic, "
                    f"{r['steps']} steps, {r.get('threads', '?')} torch threads, untraced "
                    f"{float(r['untraced_ms_per_step']):.2f} ms/step, traced "
                    f"{float(r.get('traced_ms_per_step', 'nan')):.2f} ms/step, finish() included; "
                    f"median of {r['repeats']}")
            else:
                add(row, None, f"≤ {goal:.2f}", False, "")
    flat("6 peak RSS PyTorch traced 10×/1×", "torch", lambda one, ten, m1, m10:
         f"python with reptrace.Tracer, MLP 784-256-10, f32: {m10} at {ten['steps']} steps / "
         f"{m1} at {one['steps']} steps")


def _later_rows(b, add, missing):
    """Rows 7 to 11: contributions on demand, start-up, the sort under a limit, the gradient
    check, a transformer."""
    setup = next(iter(b["query-setup"]), {})
    # 7. contributions on demand
    od = next(iter(b["ondemand"]), None)
    if od:
        c, m, sc = float(od["computed_s"]), float(od["materialised_s"]), float(od["scan_s"])
        add("7 on demand / bare scan", fmt_ratio(c / sc), f"≤ {ON_DEMAND_GOAL:.1f}", c / sc <= ON_DEMAND_GOAL,
            f"top_proponents of probe {setup.get('probe', '?')} computed on demand {c * 1e3:.0f} ms / bare scan of "
            f"the updates it reads {sc * 1e3:.0f} ms (DataFusion {float(od['df_scan_s']) * 1e3:.0f} ms, record "
            f"reader {float(od['reader_scan_s']) * 1e3:.0f} ms), {od['records']} update records, median of {od['repeats']}")
        add("7 on demand / materialised", fmt_ratio(c / m), "report", True,
            f"the same query on the {int(setup.get('contributions', 0)) / 1e6:.1f} M materialised rows: {m * 1e3:.0f} ms")
    else:
        add("7 on demand / bare scan", None, f"≤ {ON_DEMAND_GOAL:.1f}", False, "")
    dv = next(iter(b["derived"]), None)
    if dv:
        x = float(dv["ratio"])
        add("7 derived / trace bytes, demo", fmt_ratio(x), f"≤ {DERIVED_GOAL:.1f}", x <= DERIVED_GOAL,
            f"after `reptrace demo`: {int(dv['derived_bytes']) / 1e6:.2f} MB of contributions and influence / "
            f"{int(dv['trace_bytes']) / 1e6:.2f} MB of updates ({dv['attributions']} attributions)")
    else:
        add("7 derived / trace bytes, demo", None, f"≤ {DERIVED_GOAL:.1f}", False, "")

    # 8. command start-up: whole processes
    starts = {r["name"]: r for r in b["startup"]}
    version = starts.pop("version", None)
    if not starts:
        add("8 start-up", None, f"≤ {STARTUP_GOAL:.1f}", False, "")
    for name, r in starts.items():
        x = float(r["ratio"])
        same = r["rows"] == r["duckdb_rows"]
        v = f", `reptrace --version` {float(version['reptrace_s']) * 1e3:.0f} ms" if version else ""
        add(f"8 start-up {name}", fmt_ratio(x), f"≤ {STARTUP_GOAL:.1f}", x <= STARTUP_GOAL and same,
            f"whole processes: `reptrace query` {float(r['reptrace_s']) * 1e3:.0f} ms / DuckDB CLI "
            f"{float(r['duckdb_s']) * 1e3:.0f} ms, {r['rows']} result rows"
            + ("" if same else f" vs DuckDB {r['duckdb_rows']}: ROW COUNTS DIFFER")
            + f", the demo run{v}; median of {r['repeats']}")
        if not same:
            missing.append(f"8 start-up {name} (row counts differ)")

    # 9. queries under load: the sort under a memory limit
    sorts = {r["limit"]: r for r in b["rss"] if r.get("what") == "sort"}
    free = sorts.pop("none", None)
    limited = next(iter(sorts.items()), None)
    if limited is None or free is None:
        add("9 sort under a limit", None, f"≤ {SORT_RSS_GOAL}", False, "")
    else:
        text, r = limited
        limit_kb = parse_size_kb(text)
        x = int(r["max_rss_kb"]) / limit_kb
        t = float(r["wall_s"]) / float(free["wall_s"])
        add(f"9 sort peak RSS / limit {text}", f"{x:.2f}", f"≤ {SORT_RSS_GOAL}", x <= SORT_RSS_GOAL,
            f"`reptrace sql` ORDER BY dot DESC over the demo's 31 M materialised contribution rows: "
            f"peak RSS {int(r['max_rss_kb']) / 1024:.0f} MiB under --memory-limit {text} "
            f"({float(r['wall_s']):.1f} s, spilling) vs {int(free['max_rss_kb']) / 1024:.0f} MiB "
            f"without a limit ({float(free['wall_s']):.1f} s): time ×{t:.2f}")

    # 10. the Python tracer's per-step gradient check
    ck = next(iter(b["check"]), None)
    if ck:
        x = float(ck["ratio"])
        add("10 gradient check", fmt_ratio(x), f"≤ {CHECK_GOAL:.2f}", x <= CHECK_GOAL,
            f"traced with / without the per-step check, reptrace.Tracer, PyTorch MLP 784-256-10, "
            f"batch 64, {ck['steps']} steps, {ck.get('threads', '?')} torch threads, "
            f"{float(ck['with_ms_per_step']):.3f} / {float(ck['without_ms_per_step']):.3f} ms/step; "
            f"median of {ck['repeats']}")
    else:
        add("10 gradient check", None, f"≤ {CHECK_GOAL:.2f}", False, "")

    # 11. a transformer recorded by the Python tracer (issue 32): no goal of
    # its own yet (row 6's ≤ 1.15 is the PyTorch tracer's); reported.
    for r in b["torch_transformer"]:
        x = float(r["ratio"])
        add(f"11 transformer {r['dtype']}", fmt_ratio(x), "report", True,
            f"traced/untraced time, reptrace.Tracer, the test transformer (2 blocks, width 16, "
            f"sequences of 8, every layer traced), batch 16, {r['steps']} steps, 1 torch thread, "
            f"untraced {float(r['untraced_ms_per_step']):.2f} ms/step, traced "
            f"{float(r['traced_ms_per_step']):.2f}, finish() included; "
            f"{r['bytes_per_example_step']} bytes on disk per example-step; "
            f"median of {r['repeats']}")


    # 12. contributions on Spark beside DataFusion (issue 34).
    sp = next(iter(b["spark"]), None)
    for what, key, detail in (
        ("rows", "ratio", "a DataFrame of the rows, counted and summed on Spark"),
        ("attribute", "attribute_ratio", "materialised as an attribution (parts written by the executors)"),
    ):
        x = float(sp[key]) if sp and key in sp else None
        add(f"12 Spark / DataFusion, {what}", None if x is None else fmt_ratio(x), f"≥ {SPARK_GOAL:.1f}",
            x is not None and x >= SPARK_GOAL,
            "" if sp is None else
            f"records × probes per second, Spark local[2] (JVM up) / DataFusion in-process, {detail}; "
            f"digits MLP, {sp['records']} records × {sp['probes']} probes")


    # 13. recording under DDP, 2 CPU processes (issue 34): reported beside
    # row 6 (whose goal is the one-process tracer's).
    for r in b["torch_ddp"]:
        x = float(r["ratio"])
        add("13 DDP traced/untraced", fmt_ratio(x), "report", True,
            f"traced/untraced time, reptrace.Tracer under DistributedDataParallel (gloo), "
            f"{r['world']} CPU processes, MLP 784-256-10, 64 examples per rank, {r['steps']} steps, "
            f"untraced {float(r['untraced_ms_per_step']):.2f} ms/step, traced "
            f"{float(r['traced_ms_per_step']):.2f}, finish() included; median of {r['repeats']}")


def parse_size_kb(text):
    """`512MiB`, `1GiB`, `600MB` in KiB (the units of ru_maxrss)."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
    t = text.strip().lower()
    for u, f in units.items():
        if t.endswith(u):
            return float(t[: -len(u)]) * f / 1024
    return float(t) / 1024


def cmd_table(argv):
    md_out = None
    if "--md" in argv:
        i = argv.index("--md")
        md_out = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    lines = []
    for log in argv:
        lines += Path(log).read_text(errors="replace").splitlines()
    b = parse(lines)
    rows, missing = rows_from(b)
    host = machine()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = ("row", "figure", "goal", "met?", "from what")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    print(f"reptrace benchmarks, {date}")
    print(f"machine: {host}")
    print("  ".join(h.ljust(w) for h, w in zip(head[:4], widths)) + "  " + head[4])
    for r in rows:
        print("  ".join(str(c).replace("**", "").ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    met = sum(1 for r in rows if r[3] == "yes")
    print(f"{met} of {len(rows)} rows meet their goal")
    if md_out:
        md = [f"Measured {date} on {host}.", "", "| row | figure | goal | met? | from what |", "|---|---|---|---|---|"]
        md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        md += ["", f"{met} of {len(rows)} rows meet their goal."]
        md_out.parent.mkdir(parents=True, exist_ok=True)
        md_out.write_text("\n".join(md) + "\n")
        print(f"Markdown: {md_out}")
    if missing:
        print("incomplete: " + ", ".join(missing), file=sys.stderr)
        sys.exit(1)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, argv = sys.argv[1], sys.argv[2:]
    if cmd == "rss":
        cmd_rss(argv)
    elif cmd == "storage":
        cmd_storage(argv)
    elif cmd == "derived":
        cmd_derived(argv)
    elif cmd == "exe":
        cmd_exe(argv)
    elif cmd == "machine":
        print(machine())
    elif cmd == "table":
        cmd_table(argv)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
