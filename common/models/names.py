"""The names each model registry answers to, without the implementations.

The config (and so every ClientApp process) validates ``head``, ``student`` and
``trainable`` against these. They live apart from :mod:`common.models.heads`,
:mod:`common.models.students` and :mod:`common.models.finetune` because those
import torch (about 2.3 s of a cold process): a SuperNode starts a fresh
ClientApp process for every message, and three of the four messages of a
SecAgg+ round never touch a model. Each registry's keys are checked against
these names (tests/common/test_config.py).
"""

HEAD_NAMES = ("linear", "mlp")
STUDENT_NAMES = ("cnn", "mlp")
TRAINABLE_MODES = ("head", "bitfit", "last-block")
