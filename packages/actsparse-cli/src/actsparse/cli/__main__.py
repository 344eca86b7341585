"""``python -m actsparse.cli`` is the ``actsparse`` command."""

from actsparse.cli import main

raise SystemExit(main())
