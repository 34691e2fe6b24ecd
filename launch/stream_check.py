"""Stream a split the way training ranks will: every rank's share, through real DataLoader
workers, in evaluation mode (each sample once) and training mode (endless, equal per rank).

    python launch/stream_check.py --url shards/demo --world-size 2 --workers 2
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

import torch  # noqa: E402

from pipeline.data.stream import make_stream  # noqa: E402
from pipeline.data.transforms import Augment  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="shard directory or manifest URL")
    p.add_argument("--split", default=None, help="evaluation split (default: the last in the manifest)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-batches", type=int, default=20)
    args = p.parse_args()

    seen: set[str] = set()
    total = 0
    t0 = time.perf_counter()
    for rank in range(args.world_size):
        stream = make_stream(args.url, args.split or "val", train=False, rank=rank, world_size=args.world_size,
                             num_workers=args.workers)
        loader = torch.utils.data.DataLoader(stream, batch_size=args.batch, num_workers=args.workers)
        keys = [k for batch in loader for k in batch["__key__"]]
        print(f"eval  rank {rank}: {len(keys)} samples")
        total += len(keys)
        seen.update(keys)
    expected = stream.spec.manifest.num_samples(stream.spec.split)
    status = "OK" if total == len(seen) == expected else "MISMATCH"
    print(f"eval  {status}: {total} samples read, {len(seen)} distinct, manifest has {expected}")
    stream = make_stream(args.url, "train", train=True, num_workers=args.workers, augment=Augment(flip=True))
    loader = torch.utils.data.DataLoader(stream, batch_size=args.batch, num_workers=args.workers)
    batches = iter(loader)
    for _ in range(args.train_batches):
        batch = next(batches)
    shapes = {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 1}
    print(f"train {args.train_batches} batches of {args.batch}: {shapes}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if status == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
