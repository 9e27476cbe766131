"""A tiny GPT-2 built from a config (nothing downloads), trained byte-level on English text in our own loop, with
optiscope.Tracker measuring loss and sharpness and TensorBoard receiving them.

    python examples/gpt2_tracker_tensorboard.py [--tiny] [--out runs/examples/gpt2]
    tensorboard --logdir runs/examples/gpt2/tensorboard

Text: Debian's fortune files when installed (``/usr/share/games/fortunes``), else the Zen of Python. GPT-2 has
dropout 0.1 in training mode; ``mode="eval"`` measures the deterministic model (without it the tracker warns that
every checkpoint would measure one random dropout mask).
"""

import codecs
import contextlib
import io
import os
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from optiscope import Tracker
from optiscope.integrations import TensorBoardLogger

tiny = "--tiny" in sys.argv or os.environ.get("OPTISCOPE_EXAMPLE_TINY") == "1"
out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "runs/examples/gpt2"
root = Path("/usr/share/games/fortunes")
files = sorted(p for p in root.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8")) if root.is_dir() else []
with contextlib.redirect_stdout(io.StringIO()):
    import this  # prints the Zen of Python on import
text = b"".join(p.read_bytes() for p in files[:3]) or codecs.decode(this.s, "rot13").encode()
seq = 32
data = torch.tensor(list(text[: (len(text) // seq) * seq]), dtype=torch.long).view(-1, seq)

torch.manual_seed(0)
cfg = GPT2Config(vocab_size=256, n_positions=seq, n_embd=32 if tiny else 64, n_layer=1 if tiny else 2, n_head=2)
model = GPT2LMHeadModel(cfg)
probe = data[:8 if tiny else 32]
probe_batch = ({"input_ids": probe, "labels": probe}, probe)  # the model computes out.loss from the labels


def loss_fn(out, targets):
    return out.loss


opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
steps, every = (4, 2) if tiny else (300, 25)
tb = TensorBoardLogger(Path(out) / "tensorboard")
with Tracker(model, loss_fn, probe_batch, probes=["loss", "sharpness"], every=every, store=out, mode="eval",
             loggers=[tb]) as tracker:
    tracker.step(0, optimizer=opt)
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        batch = data[torch.randint(0, len(data), (16,), generator=g)]
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        m = tracker.step(step, optimizer=opt)
        if m:
            print(f"step {step:4d}  loss {m['loss']:.3f}  sharpness {m['sharpness']:.2f}")
print(f"TensorBoard: tensorboard --logdir {Path(out) / 'tensorboard'}; store: optiscope show {out}")
