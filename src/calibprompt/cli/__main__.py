"""``python -m calibprompt.cli``."""

import sys

from calibprompt.cli import main

sys.exit(main())
