import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # brute_force helpers
# The tests run tiny float64 problems: one thread is as fast, and a second OpenMP thread stalls badly on a
# loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
