from authz.cli.main import main

raise SystemExit(main())
