"""Throughput and memory of the data-preparation stage, on the bundled dumps and on the
same dumps made 10x larger (every post copied with shifted ids).

    python benchmarks/prepare_data.py                # one process, then all cores
    taskset -c 0 python benchmarks/prepare_data.py   # pin everything to one core

Prints, for each input size and process count: posts/s end to end, the rate of each step
(parse rows/s, HTML -> Markdown bodies/s per core, pairing questions/s per core, writing
rows/s) and the peak RSS of the preparing process. Each run is a fresh subprocess so its
peak RSS is its own. The reader streams, so the 10x peak should stay within ~1.2x of the 1x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import quoteattr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stackllama.data.options import default_num_proc  # noqa: E402
from stackllama.data.prepare import bundled_dumps  # noqa: E402

_ID_FIELDS = ("Id", "ParentId", "AcceptedAnswerId")
_CHILD = """
import json, resource, sys
from stackllama.data.prepare import PrepareOptions, prepare_dataset
dumps, out, num_proc = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
summary = prepare_dataset(dumps, out, PrepareOptions(num_proc=num_proc, progress=False), overwrite=True)
summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
summary["peak_rss_workers_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(summary))
"""


def scale_dump(src: Path, dst: Path, copies: int) -> None:
    """Write `copies` copies of every row of `src` into `dst`, ids shifted by 10M per copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        for copy in range(copies):
            for _, elem in ET.iterparse(src):
                if elem.tag != "row":
                    continue
                attrs = dict(elem.attrib)
                for key in _ID_FIELDS:
                    if key in attrs:
                        attrs[key] = str(int(attrs[key]) + copy * 10_000_000)
                f.write("  <row " + " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items()) + " />\n")
                elem.clear()
        f.write("</posts>\n")


def run(dumps: list[str], out: Path, num_proc: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(dumps), str(out), str(num_proc)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10, help="How many times larger the big input is.")
    parser.add_argument("--num_proc", type=int, nargs="+", default=sorted({1, default_num_proc()}),
                        help="Process counts to run with.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = {"1x": bundled_dumps(), f"{args.scale}x": []}
        for dump in bundled_dumps():
            dst = tmp / "scaled" / Path(dump).name / "Posts.xml"
            scale_dump(Path(dump) / "Posts.xml", dst, args.scale)
            inputs[f"{args.scale}x"].append(str(dst.parent))
        header = (f"{'input':>6} {'procs':>5} {'rows':>8} {'MB':>6} {'wall s':>7} {'posts/s':>8} {'parse/s':>8} "
                  f"{'md/s/core':>9} {'pair/s/core':>11} {'write/s':>8} {'peak RSS MB':>11}")
        print(header)
        rss = {}
        for num_proc in args.num_proc:
            for name, dumps in inputs.items():
                s = run(dumps, tmp / "out", num_proc)
                t = s["seconds"]
                size = sum((Path(d) / "Posts.xml").stat().st_size for d in dumps) / 2**20
                rss[(name, num_proc)] = s["peak_rss_mb"]
                written = s["preference_rows"] + s["pairs"]
                print(f"{name:>6} {num_proc:>5} {s['rows_read']:>8} {size:>6.1f} {t['total']:>7.2f} "
                      f"{s['rows_read'] / t['total']:>8.0f} {s['rows_read'] / t['parse']:>8.0f} "
                      f"{t['bodies_converted'] / t['convert']:>9.0f} "
                      f"{s['questions_with_2_answers'] / max(t['pair'], 1e-9):>11.0f} "
                      f"{written / max(t['write'], 1e-9):>8.0f} {s['peak_rss_mb']:>11.1f}"
                      + (f"  (+ workers {s['peak_rss_workers_mb']:.0f})" if num_proc > 1 else ""))
        for num_proc in args.num_proc:
            ratio = rss[(f"{args.scale}x", num_proc)] / rss[("1x", num_proc)]
            print(f"peak RSS {args.scale}x / 1x with {num_proc} process(es): {ratio:.2f}")


if __name__ == "__main__":
    main()
