"""One rank of a streaming test, run as its own process: iterates a ShardStream through a real
DataLoader and prints what it consumed as JSON. With --dist it joins a gloo process group and
all-reduces once per batch, so a rank that ran out of batches would hang its peer."""

import argparse
import datetime
import json
import sys

import torch

from pipeline.data.stream import make_stream
from pipeline.data.transforms import Augment

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--split", default="train")
p.add_argument("--rank", type=int, default=0)
p.add_argument("--world", type=int, default=1)
p.add_argument("--workers", type=int, default=0)
p.add_argument("--train", action="store_true")
p.add_argument("--batch", type=int, default=2)
p.add_argument("--steps", type=int, default=0, help="batches to take in training mode")
p.add_argument("--dist", help="tcp://127.0.0.1:PORT of a gloo rendezvous")
args = p.parse_args()

torch.set_num_threads(1)
if args.dist:
    torch.distributed.init_process_group("gloo", init_method=args.dist, rank=args.rank, world_size=args.world,
                                         timeout=datetime.timedelta(seconds=60))
stream = make_stream(args.url, args.split, train=args.train, rank=args.rank, world_size=args.world,
                     num_workers=args.workers, seed=7, augment=Augment(crop=(16, 12)), shuffle_buffer=4,
                     batch_size=args.batch)
loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers)
records = []
for step, batch in enumerate(loader):
    if args.train and step >= args.steps:
        break
    if args.dist:
        ones = torch.ones(1)
        torch.distributed.all_reduce(ones)  # every rank must reach every step
        assert ones.item() == args.world
    records.append({name: batch[name].tolist() if torch.is_tensor(batch[name]) else batch[name]
                    for name in ("__key__", "__slot__", "__epoch__", "__index__", "__bad__")})
if args.dist:
    torch.distributed.barrier()  # orders: no rank tears down the group while a peer still reduces
    torch.distributed.destroy_process_group()
json.dump({"rank": args.rank, "len": len(stream), "batches": records}, sys.stdout)
