"""Runs train_gpt.py's main in float64 (CPU computes in the default dtype): a world-size comparison then
differs by float64 rounding only, which Adam's near-sign first steps cannot amplify into visible differences."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_default_dtype(torch.float64)
import train_gpt  # noqa: E402  (after the default dtype is set)

if __name__ == "__main__":
    sys.exit(train_gpt.main(sys.argv[1:]))
