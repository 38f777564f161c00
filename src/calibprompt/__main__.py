"""``python -m calibprompt``: the command line."""

from calibprompt.cli import main

raise SystemExit(main())
