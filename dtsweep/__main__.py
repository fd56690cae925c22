from dtsweep.cli import main

raise SystemExit(main())
