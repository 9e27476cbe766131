"""Test-session settings shared by every test module.

The tests use small models, where torch's intra-op threading costs more than it gains (and on a loaded 2-core
machine much more); one thread also makes float32 results independent of the machine's core count.

The user's cache directory is redirected to a temporary one for the session: ``optiscope reproduce`` remembers the
measured time of every finished experiment there, and the tests' fake experiments must not end up in it.
"""

import os
import tempfile

import torch

torch.set_num_threads(1)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="optiscope-test-cache-")
