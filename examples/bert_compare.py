"""SGD with momentum vs Adam on a small BERT built from a config (nothing downloads), with dict inputs
(``input_ids``, ``attention_mask``) straight into the lab's ``compare``: same initialization, same batches,
loss, sharpness and per-layer R_med of the weight matrices.

    python examples/bert_compare.py [--tiny] [--out runs/examples/bert]

Task: does the sequence contain token 7? (synthetic, seeded). Dropout is switched off in the config: with it, every
probe would measure one random sub-network (optiscope warns when that happens).
"""

import os
import sys

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from optiscope.lab import Problem, compare

tiny = "--tiny" in sys.argv or os.environ.get("OPTISCOPE_EXAMPLE_TINY") == "1"
out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "runs/examples/bert"
g = torch.Generator().manual_seed(0)
n, seq, vocab = (64, 12, 30) if tiny else (512, 16, 30)
ids = torch.randint(1, vocab, (n, seq), generator=g)
lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
ids = ids * mask  # 0 = padding
labels = ((ids == 7) & (mask == 1)).any(1).long()

torch.manual_seed(0)
cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1 if tiny else 2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=seq, num_labels=2,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
model = BertForSequenceClassification(cfg)


def loss_fn(out, y):
    return F.cross_entropy(out.logits, y)  # the model returns an output object; read .logits


problem = Problem(model, loss_fn, train=({"input_ids": ids, "attention_mask": mask}, labels))
steps, every = (4, 2) if tiny else (200, 25)
res = compare(problem, {"sgdm": "sgdm:lr=0.05,momentum=0.9", "adam": "adam:lr=1e-3"}, steps=steps, batch_size=32,
              probe_every=every, probes=["loss", "accuracy", "sharpness", "r_med:per_layer=50,params=weights"],
              store=out)
for name, run in res.runs.items():
    m = run.metrics
    last = m[m["step"] == m["step"].max()]
    vals = dict(zip(last["metric"] + "/" + last["layer"], last["value"]))
    rmed = last[last["metric"] == "r_med"]["value"]
    print(f"{name}: {run.status}; loss {vals['loss/']:.3f}, accuracy {vals['accuracy/']:.2f}, "
          f"sharpness {vals['sharpness/']:.3f}, median R_med over weight matrices {rmed.median():.1f}")
print(f"optiscope show {out}; optiscope plot {out}")
