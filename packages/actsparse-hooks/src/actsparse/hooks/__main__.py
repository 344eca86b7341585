from actsparse.hooks.workflow import main

raise SystemExit(main())
