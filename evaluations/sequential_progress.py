"""Report what the methods of a sequential comparison have measured so far, finished or not.

(`kn-edit compare --config FILE --progress` prints the same tables without writing anything; this script also
writes the report folder and joins an earlier report's methods, ``--merge``.)

`kn-edit compare` keeps each finished method under ``OUTPUT/.NAME.parts/METHOD.json`` and, in sequential mode,
the checkpoints a method has reached under ``METHOD.progress.json`` (rewritten after each checkpoint). A run
of 100 edits per method can outlast a machine's time; this writes one report from both kinds of file: per
method its checkpoint table (marked stopped where it did not reach its last edit), ``curves.json``,
``curves.png`` and the per-edit rows.

    .venv/bin/python evaluations/sequential_progress.py --parts runs/.sequential100_smollm2.parts \\
        --config configs/compare/sequential100_smollm2.yaml --out evaluations/results/sequential100_smollm2

``--merge DIR`` also takes the methods of an earlier report written by this script (its ``curves.json``,
``facts-METHOD.jsonl`` and the seconds in its ``report.md``) where the parts folder has none of its own: runs
made on another day, whose parts folder is gone, join the new ones in one report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_edit.evaluation.kept import kept_methods as read_methods  # noqa: E402
from kn_edit.evaluation.plots import curve_figure  # noqa: E402
from kn_edit.evaluation.report import curve_markdown, write_jsonl  # noqa: E402


def read_report(folder: Path) -> dict[str, dict]:
    """The methods of an earlier report folder, in the form of `kept_methods` (all of them finished runs)."""
    curves_path = folder / "curves.json"
    if not curves_path.is_file():
        sys.exit(f"error: {folder} holds no curves.json (not a report of this script)")
    curves = json.loads(curves_path.read_text())
    seconds = _report_seconds(folder / "report.md")
    found: dict[str, dict] = {}
    for method, curve in curves.items():
        rows_path = folder / f"facts-{method}.jsonl"
        if not rows_path.is_file():
            sys.exit(f"error: {rows_path} is missing (the report's per-edit rows of {method})")
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
        made = curve[-1]["n_edits"] if curve else 0
        planned = seconds.get(method, (None, made))[1]
        found[method] = {"curve": curve, "rows": rows, "edits_made": made, "edits_planned": planned,
                         "seconds": seconds.get(method, (None, made))[0], "finished": made >= planned}  # fmt: skip
    return found


def _report_seconds(report: Path) -> dict[str, tuple[float | None, int]]:
    """{method: (wall seconds, edits planned)} from the status table at the top of a report.md."""
    found: dict[str, tuple[float | None, int]] = {}
    if not report.is_file():
        return found
    for line in report.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[2].isdigit():
            try:
                wall = float(cells[4])
            except ValueError:
                wall = None
            found[cells[0].strip("`")] = (wall, int(cells[2]))
    return found


def markdown(name: str, methods: dict[str, dict], config_text: str | None) -> str:
    lines = [f"# Sequential comparison `{name}`: what each method measured", "",
             "| method | edits made | of | status | wall seconds |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for method, m in methods.items():
        status = "finished" if m["finished"] else f"stopped after edit {m['edits_made']}"
        lines.append(f"| `{method}` | {m['edits_made']} | {m.get('edits_planned', m['edits_made'])} | {status} | "
                     f"{m.get('seconds', '–')} |")
    lines += ["", "Each table row is a checkpoint (edits made so far); a stopped method has no rows past the last "
              "checkpoint it reached. The edits are reverted at the end of a finished run (checked bit for bit); a "
              "stopped run's process ended with them.", ""]  # fmt: skip
    lines.append(curve_markdown({m: v["curve"] for m, v in methods.items()}))
    lines += ["![curves](curves.png)", ""]
    if config_text:
        lines += ["## Configuration", "", "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", required=True, help="the comparison's parts folder (OUTPUT/.NAME.parts)")
    parser.add_argument("--out", required=True, help="folder to write the report into (created or refreshed)")
    parser.add_argument("--config", help="the comparison's config file, copied into the report")
    parser.add_argument("--merge", help="an earlier report folder whose methods join those of --parts")
    args = parser.parse_args()
    parts, out = Path(args.parts), Path(args.out)
    if not parts.is_dir():
        sys.exit(f"error: {parts} is not a folder")
    methods = read_methods(parts)
    if args.merge:
        earlier = read_report(Path(args.merge))  # read before --out (possibly the same folder) is rewritten
        methods = {**{m: v for m, v in earlier.items() if m not in methods}, **methods}
    if not methods:
        sys.exit(f"error: {parts} holds no method's results")
    out.mkdir(parents=True, exist_ok=True)
    config_text = Path(args.config).read_text() if args.config else None
    name = parts.name.strip(".").removesuffix(".parts")
    curves = {m: v["curve"] for m, v in methods.items()}
    (out / "curves.json").write_text(json.dumps(curves, indent=1, allow_nan=True))
    curve_figure(curves, out / "curves.png")
    for method, m in methods.items():
        write_jsonl(out / f"facts-{method}.jsonl", m["rows"])
    (out / "report.md").write_text(markdown(name, methods, config_text))
    if args.config:
        shutil.copyfile(args.config, out / "config.yaml")
    print(f"wrote {out}: " + ", ".join(f"{m} {v['edits_made']} edits" for m, v in methods.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
