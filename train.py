"""Train a network on preprocessed slices (one process, or torchrun for several GPUs).

The program is :mod:`commands.train`, installed as ``immseg-train`` too;
``python train.py --help`` lists its options.
"""

import sys

from commands.train import main

if __name__ == "__main__":
    sys.exit(main())
