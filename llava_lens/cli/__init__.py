"""The ``llava-lens`` command line: one module per command family, one options dataclass per command.

``trace`` (``demo``, ``trace``, ``report``), ``sweep`` (``sweep``, ``summary``), ``grounding``
(``eval-grounding``, ``heads``); ``common`` holds the shared options and checks, ``main`` the entry point.
Importing this package loads no torch/transformers: each command imports what it needs when it runs.
"""

from llava_lens.cli.grounding import CALIBRATION_SEED, EVAL_SEED
from llava_lens.cli.main import build_parser, main

__all__ = ["main", "build_parser", "EVAL_SEED", "CALIBRATION_SEED"]
