"""EDM geometry: learn gene expression -> intrinsic spatial geometry from Visium spots.

Pure modules (no dagster): ``targets`` (sets and canonical coordinates from the Gram
matrix), ``encoder`` (the frozen expression encoder), ``models`` (ISAB set encoder,
generator, FiLM denoiser), ``edm`` (Karras et al. 2022 preconditioning, loss, Heun
sampler), ``losses``, ``train`` (resumable, atomic checkpoints), ``evaluate`` (metrics and
baselines). ``assets.py`` wires them into Dagster.
"""
