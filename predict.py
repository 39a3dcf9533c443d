"""Segment a new patient's raw bSSFP/LGE/T2w NIfTI files.

The program is :mod:`commands.predict`, installed as ``immseg-predict`` too;
``python predict.py --help`` lists its options.
"""

import sys

from commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
