"""Write data/fmnist-mini/: the first N training and test images of Fashion-MNIST (MIT licence) in the dataset's
own gzipped IDX format, so lab 05 and the image tests run on a machine without the full dataset.

    python scripts/make_fmnist_mini.py [--source DIR] [--count 2000]
"""
import argparse
import gzip
import struct
from pathlib import Path

import torch

from dmd2lab import image_data


def write_idx(path: Path, array, magic: int):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    # mtime=0: the same bytes on every run.
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header + array.tobytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="folder of the full dataset (default: the usual places)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--out", default="data/fmnist-mini")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = image_data.load_images("fmnist", split, args.source, limit=args.count)
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", data.images[:, 0].numpy(), 0x803)
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", data.labels.to(torch.uint8).numpy(), 0x801)
        print(f"{split}: {len(data)} images")


if __name__ == "__main__":
    main()
