"""Write a small dataset in the folder benchmark's layout, to try `data.benchmark: folder` or to copy
the layout from:

    python examples/folder_example.py my_data [--images 72] [--classes 6] [--size 96]

my_data/images/photo_000.jpg ..., my_data/labels/photo_000.png ... (0 background, i the i-th line of
classes.txt, 255 ignore), my_data/classes.txt. examples/folder (the default data.folder.root) is this
script's output with its defaults.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.synthetic import write_folder_example  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write (created; files of the same names are replaced)")
    ap.add_argument("--images", type=int, default=72)
    ap.add_argument("--classes", type=int, default=6, help="how many of the 20 synthetic shapes (2..20)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 2 <= args.classes <= 20 or args.images < 4 or args.size < 32:
        sys.exit("error: --classes must be 2..20, --images at least 4, --size at least 32")
    root = write_folder_example(args.out, args.images, args.size, args.seed, args.classes)
    print(f"wrote {args.images} images of {args.classes} classes to {root}; use it with data.benchmark: folder and "
          f"data.folder.root: {args.out}")


if __name__ == "__main__":
    main()
