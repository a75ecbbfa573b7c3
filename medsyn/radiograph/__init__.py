"""Chest radiographs: the 2D side of the second seed paper (DRRs of CT volumes, real radiographs, and a
report-to-radiograph generator: a VQ-GAN tokenizer and a causal language model over its codes)."""
