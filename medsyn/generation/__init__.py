"""Generation: load a trained run (no LightningModule), sample base / SR / the cascade, hold channels
fixed, evaluate the SR network by windows, write samples with provenance, segment by fixing the CT.

    model.py     the denoiser + conditioners of a run config (the builder training uses too)
    run.py       load a run directory: config, EMA weights, the grid it generates on
    stages.py    `generate` for any model, base and SR stages, the cascade (`synthesize`)
    fixed.py     `--fix` files: read, validate, bring onto the run's grid, encode
    windowed.py  the SR denoiser evaluated window by window with Gaussian blending
    output.py    the files of each sample (NIfTI, preview, meta.json), written atomically
    segment.py   the model as a segmenter: masks sampled with the CT held fixed
"""
