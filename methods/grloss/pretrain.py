"""The pretrained backbone of the ``cmnist`` protocol (issue #25): the paper fine-tunes an
ImageNet-pretrained ResNet-50 on single-positive labels; here the MosaicCNN backbone is first
trained on a disjoint labelled task, single-label 80-way classification of one coloured digit per
canvas drawn from its own 40% of the MNIST images (``data.pretraining_data``), then fine-tuned.

    python -m methods.grloss.pretrain --out runs/grloss_pretrained.pt [--epochs 30]

The file holds the backbone's state dict and the pretraining record (held-out accuracy of the
last epoch, seconds); it is written once (atomically) and reused.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from typing import Dict

import torch
import torch.nn.functional as F

from methods.common import cli_main, progress, seed_everything

from .data import CMNIST_CLASSES, DATA_SEED, pretraining_data
from .model import WIDTH, MosaicCNN


def pretrain_backbone(
    out: str,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    n: int = 8000,
    seed: int = 0,
    data_seed: int = DATA_SEED,
    show_progress: bool = True,
) -> Dict:
    """Train MosaicCNN(CMNIST_CLASSES, RGB) with cross-entropy on the pretraining canvases (90% train;
    10% held out, from digit images of their own), Adam at ``lr`` with a cosine schedule; save
    {backbone, record} to ``out``. An existing ``out`` is reused when its record has the same
    settings, and refused otherwise. Returns the record."""
    want = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "n": n, "seed": seed, "data_seed": data_seed}
    if os.path.exists(out):
        record = torch.load(out, map_location="cpu", weights_only=False)["record"]
        if {k: record.get(k) for k in want} != want:
            raise ValueError(
                f"{out} holds a backbone pretrained with { ({k: record.get(k) for k in want}) }, not {want}; "
                "remove it or choose another file"
            )
        return record
    if epochs < 1 or batch_size < 1 or n < 20 or not lr > 0:
        raise ValueError(
            f"pretrain_backbone: need epochs >= 1, batch_size >= 1, n >= 20, lr > 0; "
            f"got {epochs}, {batch_size}, {n}, {lr}"
        )
    seed_everything(seed)
    x_tr, y_tr, x_ho, y_ho = pretraining_data(n, data_seed)
    k = len(y_ho)
    model = MosaicCNN(CMNIST_CLASSES, width=WIDTH["cmnist"], in_channels=3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    bar = progress(range(epochs), enabled=show_progress, desc="pretrain", unit="epoch")
    acc = 0.0
    for _ in bar:
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(y_tr), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = float(
                (torch.cat([model(x_ho[i : i + 500]) for i in range(0, k, 500)]).argmax(1) == y_ho).float().mean()
            )
        bar.set_postfix(heldout_acc=f"{acc:.3f}")
    record = {**want, "heldout_acc": acc, "seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save({"backbone": model.backbone.state_dict(), "record": record}, tmp)
    os.replace(tmp, out)
    return record


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.grloss.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/grloss_pretrained.pt", help="the backbone file (default: %(default)s)")
    defaults = inspect.signature(pretrain_backbone).parameters  # the flags' defaults are the function's
    for name, kind, what in (
        ("epochs", int, "epochs"),
        ("lr", float, "Adam learning rate (cosine schedule)"),
        ("batch_size", int, "batch size"),
        ("n", int, "pretraining canvases"),
        ("seed", int, "random seed"),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=defaults[name].default,
            help=f"{what} (default: %(default)s)",
        )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    rec = pretrain_backbone(
        a.out, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, n=a.n, seed=a.seed, show_progress=not a.no_progress
    )
    print(f"backbone in {a.out}: held-out accuracy {rec['heldout_acc']:.4f} ({rec['seconds'] / 60:.1f} min)")
    return 0


main = cli_main(_main)

if __name__ == "__main__":
    sys.exit(main())
