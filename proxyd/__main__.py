"""`python -m proxyd` is the same program as the `proxyd` console script."""

from proxyd.cli import main

raise SystemExit(main())
