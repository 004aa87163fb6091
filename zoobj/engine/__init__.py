"""The engine: MeZO itself, on a list of tensors and a closure -> float.

No transformers import anywhere below this folder (a test imports it with transformers
blocked): ``mezo`` (the optimizer: seeds, probe, estimate, commit, record, replay),
``noise`` (counter-based Gaussian kernels), ``perturb`` (in place or by forward hooks),
``shaping`` (how a step's losses become coefficients), ``rules`` (sgd, momentum, adam),
``calibrate`` (``--eps auto``) and ``trajectory`` (records on disk).
"""
