from sakeystate.cli import main

raise SystemExit(main())
