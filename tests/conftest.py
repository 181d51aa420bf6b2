"""Suite-wide settings."""

import os

import torch

# The suite is many small tensors on a 2-core machine: one intra-op thread avoids
# oversubscription (other test processes, DDP subprocesses) without slowing small ops.
torch.set_num_threads(1)

# Kernel choices measured by tests stay in their process (and in the subprocesses they start): the
# user's per-machine file (qat.kernels.choices_file) is neither read nor written. Tests of that file
# set QAT_KERNEL_CHOICES to a path of their own.
os.environ["QAT_KERNEL_CHOICES"] = "off"
