"""One rank of the ``torch.distributed`` baseline of ``benchmarks/scaleout.py``: every block of a
packed model broadcast from rank 0 with the gloo backend (``dist.broadcast`` of its bytes as a
uint8 tensor), one collective per block, in block order.

Rank 0 maps the block files of ``--blocks-dir``; the other ranks receive into tensors allocated
before the start (memory, not files: the baseline writes nothing). Gloo's broadcast is a binomial
tree over whole tensors (gloo/broadcast.cc): no pipelining inside a block.

    python benchmarks/gloo_broadcast.py --rank R --world N --master HOST:PORT --iface eth0 \\
        --model-dir PACKED [--blocks-dir DIR] --go-file F --report out.json

Torch takes seconds to import here, so the start is a handshake rather than a fixed time: each
rank joins the group, passes a barrier, prints ``ready``, then polls ``--go-file`` for the shared
wall-clock start time (epoch seconds) that the benchmark writes once every rank is ready. The
report: ``{"rank", "start_epoch_s", "arrival_s": {block: s since the start}, "cpu_s"}``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path

GO_POLL_S = 0.005


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True, help="HOST:PORT of rank 0's TCP store")
    ap.add_argument("--iface", default="eth0", help="the interface gloo uses (GLOO_SOCKET_IFNAME)")
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--blocks-dir", type=Path, help="rank 0: where its block files are")
    ap.add_argument("--go-file", type=Path, required=True)
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--timeout-s", type=float, default=600.0)
    args = ap.parse_args()
    os.environ["GLOO_SOCKET_IFNAME"] = args.iface

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    blocks = json.loads((args.model_dir / "manifest.json").read_text())["blocks"]
    if args.rank == 0:
        maps = []
        for b in blocks:
            with open((args.blocks_dir or args.model_dir) / b["file"], "rb") as f:
                maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
        tensors = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        for t in tensors:  # in memory before the start, like the agents' source files
            t.sum()
    else:
        tensors = [torch.empty(b["size_bytes"], dtype=torch.uint8) for b in blocks]
        for t in tensors:
            t.fill_(0)  # fault the pages in before the start
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=args.timeout_s))
    dist.barrier()
    print("ready", flush=True)
    while not args.go_file.exists():
        time.sleep(GO_POLL_S)
    start_at = float(args.go_file.read_text())
    time.sleep(max(0.0, start_at - time.time()))
    start_epoch_s, cpu0 = time.time(), cpu_s()
    arrival_s = {}
    for i, t in enumerate(tensors):
        dist.broadcast(t, src=0)
        arrival_s[i] = time.time() - start_epoch_s
    out = {"rank": args.rank, "start_epoch_s": start_epoch_s, "arrival_s": arrival_s,
           "cpu_s": cpu_s() - cpu0}
    dist.barrier()
    dist.destroy_process_group()
    args.report.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
