"""``python -m actsparse.hooks`` is the ``actsparse`` command."""

from actsparse.hooks.cli import main

raise SystemExit(main())
