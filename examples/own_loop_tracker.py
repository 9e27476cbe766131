"""Your own training loop with optiscope.Tracker: an MLP on scikit-learn's digits trained with torch.optim.Adam,
measuring loss, sharpness, per-layer R_med and Adam's preconditioned sharpness every 25 steps.

    python examples/own_loop_tracker.py [--tiny] [--out runs/examples/own_loop]
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optiscope import Tracker
from optiscope.zoo import load_dataset

tiny = "--tiny" in sys.argv or os.environ.get("OPTISCOPE_EXAMPLE_TINY") == "1"
out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "runs/examples/own_loop"
torch.manual_seed(0)
ds = load_dataset("digits")
X, y = ds.train
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
epochs, every = (1, 10) if tiny else (8, 25)
probes = ["loss", "accuracy", "sharpness", "r_med:per_layer=50", "precond_sharpness"]

with Tracker(model, F.cross_entropy, (X[:512], y[:512]), probes=probes, every=every, store=out) as tracker:
    step = 0
    tracker.step(step, optimizer=opt)  # the initialization
    for epoch in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            m = tracker.step(step, optimizer=opt)
            if m and (step % (4 * every) == 0 or tiny):
                print(f"step {step:4d}  loss {m['loss']:.3f}  sharpness {m['sharpness']:.2f}  "
                      f"precond. sharpness {m.get('precond_sharpness', float('nan')):.1f} "
                      f"(threshold {m.get('precond_sharpness_threshold', float('nan')):.0f})")
        if tiny:
            break
print(f"{tracker.n_measurements} checkpoints, probes {tracker.probe_seconds:.1f} s; "
      f"optiscope show {out}; optiscope plot {out}")
