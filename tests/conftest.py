"""Test-session settings shared by every test module.

The tests use small models, where torch's intra-op threading costs more than it gains (and on a loaded 2-core
machine much more); one thread also makes float32 results independent of the machine's core count.
"""

import torch

torch.set_num_threads(1)
