from anomalens.cli.main import main

raise SystemExit(main())
