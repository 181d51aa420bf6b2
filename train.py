"""Launch a QAT run: `python train.py [RECIPE.yaml] [key=value ...]` (the same as `qat train ...`)."""

import sys

from qat.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
