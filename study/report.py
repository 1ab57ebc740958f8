"""Every study table from the committed run records: each task's ``results.md`` (and CSV/JSON), then STUDY.md's
decision table across tasks and its measure table, between the ``<!-- study-tables:begin/end -->`` markers.

    python study/report.py --document STUDY.md configs/study_minilm_rt.yaml configs/study_minilm_debates.yaml
    make study-tables                                    # the same, for every task config of the study

A config whose records folder has no runs yet is left out (and said so); nothing is trained.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "recipes", ROOT):  # the recipes' kit; the study package (run as `python study/report.py`)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from kit import load_config  # noqa: E402

from study import run  # noqa: E402
from study.tables import decision_markdown, splice_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="study configs (configs/study_*.yaml), in the tables' order")
    parser.add_argument("--document", default="STUDY.md", help="the Markdown file whose marked section is rewritten")
    cli = parser.parse_args(argv)
    summaries = {}
    for config in cli.configs:
        folder = Path(load_config(config)["study_records_dir"])
        if not any((folder / "runs").glob("*/*.json")) and not (folder / "runs.jsonl").is_file():
            print(f"{config}: no run records in {folder} yet; left out")
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # its results.md, printed in full otherwise
            run.main(["--config", config, "--study_only_aggregate", "true"])
        summaries[folder.as_posix()] = json.loads((folder / "summary.json").read_text())
        print(f"{config}: {folder}/results.md rebuilt")
    document = Path(cli.document)
    document.write_text(splice_report(document.read_text(), decision_markdown(summaries)))
    print(f"{document}: decision and measure tables of {len(summaries)} task(s) rewritten")
    return summaries


if __name__ == "__main__":
    main()
