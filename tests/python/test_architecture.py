"""docs/architecture.md's crate table says which reptrace crates each crate
uses; it must match the Cargo.toml files (normal dependencies), name every
crate of the workspace, and keep the test kit a dev-only dependency."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cargo_graph():
    """{crate: (uses, dev_uses)} from crates/*/Cargo.toml, reptrace crates only."""
    graph = {}
    for manifest in sorted((ROOT / "crates").glob("*/Cargo.toml")):
        doc = tomllib.loads(manifest.read_text())
        name = doc["package"]["name"]

        def ours(table):
            return {d for d in doc.get(table, {}) if d.startswith("reptrace-")}

        graph[name] = (ours("dependencies"), ours("dev-dependencies"))
    return graph


def documented_graph():
    """{crate: uses} from the table under '| crate | folder | uses |' in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = {}
    header = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| crate |"):
            header = cells
            continue
        if header is None:
            continue
        if not line.startswith("|"):
            if rows:
                break
            continue
        if set(line) <= set("|-: "):
            continue
        row = dict(zip(header, cells))
        crate = re.fullmatch(r"`(reptrace-[a-z]+)`", row["crate"])
        assert crate, f"docs/architecture.md: crate cell {row['crate']!r}"
        rows[crate.group(1)] = set(re.findall(r"`(reptrace-[a-z]+)`", row["uses"]))
    assert rows, "docs/architecture.md: no '| crate | folder | uses |' table"
    return rows


def test_crate_table_matches_cargo():
    cargo = cargo_graph()
    docs = documented_graph()
    assert sorted(docs) == sorted(cargo), "crates in docs/architecture.md vs crates/*/Cargo.toml"
    for crate, (uses, _) in cargo.items():
        assert docs[crate] == uses, f"{crate}: docs say it uses {sorted(docs[crate])}, Cargo.toml {sorted(uses)}"


def test_dependencies_point_one_way_and_the_kit_is_dev_only():
    cargo = cargo_graph()
    for crate, (uses, dev) in cargo.items():
        assert "reptrace-testkit" not in uses, f"{crate}: reptrace-testkit must be a dev-dependency"
    # No cycle among normal dependencies: a topological order exists.
    left = {c: set(uses) for c, (uses, _) in cargo.items()}
    while left:
        ready = [c for c, uses in left.items() if not uses & left.keys()]
        assert ready, f"dependency cycle among {sorted(left)}"
        for c in ready:
            del left[c]
