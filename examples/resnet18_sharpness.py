"""Sharpness (top Hessian eigenvalue) of a ResNet-18 along training, on scikit-learn's digits upsampled to 3x32x32.

    python examples/resnet18_sharpness.py [--tiny] [--out runs/examples/resnet18]

The first curvature number takes three lines beyond the model and the data (marked below). ``--tiny`` (or
``OPTISCOPE_EXAMPLE_TINY=1``) uses an 8-channel-wide ResNet-18 and a few steps, for smoke tests.
"""

import os
import sys

import torch
import torch.nn.functional as F

from optiscope.zoo import load_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _resnet18 import resnet18  # noqa: E402  (torchvision's resnet18 when it imports, else the same net built here)

tiny = "--tiny" in sys.argv or os.environ.get("OPTISCOPE_EXAMPLE_TINY") == "1"
out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "runs/examples/resnet18"
torch.manual_seed(0)
ds = load_dataset("digits", flatten=False)
X = F.interpolate(ds.train[0], size=32, mode="bilinear").repeat(1, 3, 1, 1)  # (N, 3, 32, 32)
y = ds.train[1]
model, source = resnet18(num_classes=10, width=8 if tiny else 64)
print(f"ResNet-18 ({source}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, train mode")
Xp, yp = X[:16 if tiny else 128], y[:16 if tiny else 128]  # probe batch

# --- the first curvature number: three lines
from optiscope import Hessian  # noqa: E402
H = Hessian(model, F.cross_entropy, (Xp, yp))
print(f"sharpness at init: {H.eigenvalues(k=1).values[0]:.4f}")

# --- along training, in our own loop
from optiscope import Tracker  # noqa: E402

steps, every, batch = (4, 2, 16) if tiny else (200, 20, 64)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
with Tracker(model, F.cross_entropy, (Xp, yp), probes=["loss", "sharpness"], every=every, store=out) as tracker:
    tracker.step(0, optimizer=opt)
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(X), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        m = tracker.step(step, optimizer=opt)
        if m:
            print(f"step {step:4d}  loss {m['loss']:.4f}  sharpness {m['sharpness']:.4f}  (2/lr = {2 / 0.05:.0f})")
print(f"stored in {out}: optiscope show {out}; optiscope plot {out}")
