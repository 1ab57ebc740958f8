import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # brute_force helpers
# The recipes' kit (`from kit import …`, as a recipe run as a script finds it) and the study package; neither is in
# the wheel.
for folder in (ROOT / "recipes", ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
# The tests run tiny float64 problems: one thread is as fast, and a second OpenMP thread stalls badly on a
# loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
