"""The run side: settings (``config``), objectives (``objective``), a model made ready
for training (``session``), the training loop (``train``), rebuild and export
(``export``), ``compare``, curves (``plots``) and torchrun processes (``distributed``).
"""
