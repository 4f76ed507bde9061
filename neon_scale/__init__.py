"""neon_scale: Neon (negative extrapolation from self-training) for image generators.

Layers, bottom up; a module imports only from its own layer and those below (tests/test_layers.py):

1. foundation   errors, slurm, fields, dist, console, io, rng, stop, lock, ckpt_files, doctor
2. kernels      Triton kernels and their torch twins (kernels/, installed as neon_scale.kernels)
3. leaves       models (networks, samplers, VAEs), sampling, data, metrics (images or features in),
                merge (readers, writer, formula), tracking
4. specs        the registry: one ModelSpec per model binds its network to the stages
5. config       typed run configuration, model args checked through the registry
6. train        DeepSpeed engine and JSON, training checkpoints, EMA, resharding
7. stages       base, synth, train, sweep; pipeline; selection (the rule choosing w)
8. cli          thin shells over library calls
"""
__version__ = "0.1.0"
