"""Adversarial robustness records (FGSM / PGD, qat.eval.adversarial): the digits default run, the vision run."""
