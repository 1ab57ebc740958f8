"""Print a pip constraints file that pins every dependency of pyproject.toml to its declared floor.

    python3 mk/floor.py [EXTRA ...] > floor.txt      # core dependencies plus these extras (default: test, plots)

Each ``name>=X`` becomes ``name==X`` (an upper bound or exclusion after it is kept out: the floor is the point).
``make test-floor`` installs with it and runs the core tests, so the floors in pyproject.toml are versions that
were tested together, not guesses. Needs Python >= 3.11 (tomllib).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:] or ["test", "plots"]:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+).*", requirement)
    if match:  # self-references (fam_hf[plots]) and unversioned names have no floor
        print(f"{match[1]}=={match[3]}")
