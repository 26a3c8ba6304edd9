"""Training code: degradations (:mod:`realisr.train.degradations`), losses, trainers and YAML recipes.

Nothing here is imported by ``import realisr`` or by the inference pipelines; import the sub-modules you
need (they import torch).
"""

__all__: list[str] = []
