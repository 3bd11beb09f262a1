"""Validation: what training scores its generator on, and how.

* :mod:`raysr.validation.pairs` — the validation pairs as SR benchmarks define them (GTmod HR,
  exact bicubic LR), from a folder or shards. No torch model, no Ray.
* :mod:`raysr.validation.validator` — :class:`~raysr.validation.validator.Validator`: the images,
  their bicubic baseline and the networks that score a generator on them, in one process. No Ray.
* :mod:`raysr.validation.queue` — rank 0's validations handed to a Validator in a Ray actor
  (``run.validation=async``) or scored in place (``inline``). The only Ray-aware module here.

The package itself imports nothing, so loading the pairs never pulls in a model or Ray.
"""
