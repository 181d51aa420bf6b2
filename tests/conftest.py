"""Suite-wide settings."""

import torch

# The suite is many small tensors on a 2-core machine: one intra-op thread avoids
# oversubscription (other test processes, DDP subprocesses) without slowing small ops.
torch.set_num_threads(1)
