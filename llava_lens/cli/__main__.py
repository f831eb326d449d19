"""``python -m llava_lens.cli``."""

import sys

from llava_lens.cli.main import main

sys.exit(main())
