from mecs.cli import main

raise SystemExit(main())
