"""SHA-256 of a detect run's rasters and of the content of its GeoPackage layers (the file itself
holds timestamps), to show that a change of code leaves the outputs byte-identical.

    python benchmarks/output_digest.py outputs/demo [--expect benchmarks/results/demo_digest.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
from pathlib import Path


def digest(out_dir: Path) -> dict[str, str]:
    """``{file: sha256}`` of every ``.tif`` and ``{gpkg:layer: sha256}`` of each layer's rows."""
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out_dir.glob("*.tif"))}
    for gpkg in sorted(out_dir.glob("*.gpkg")):
        with sqlite3.connect(gpkg) as db:
            for (table,) in db.execute("select table_name from gpkg_contents order by 1"):
                rows = list(db.execute(f'select * from "{table}" order by 1'))
                out[f"{gpkg.name}:{table}"] = hashlib.sha256(repr(rows).encode()).hexdigest()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--expect", type=Path, help="JSON of a previous digest: exit 1 on any difference")
    parser.add_argument("--save", type=Path, help="write the digest as JSON")
    args = parser.parse_args()
    got = digest(args.out_dir)
    for name, value in got.items():
        print(f"{value}  {name}")
    if args.save:
        args.save.write_text(json.dumps(got, indent=2) + "\n")
    if args.expect:
        want = json.loads(args.expect.read_text())
        differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        print("identical" if not differ else f"DIFFERENT: {', '.join(differ)}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
