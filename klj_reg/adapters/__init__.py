"""One module per framework; each is the only place that knows its framework.

They are imported lazily by :mod:`klj_reg.registry` when a model using the framework is
attached, and register installers (capture hooks), runners (how to run the model's
data-to-latent pass) and neutral layers (permutations, reshapes, containers).
"""
