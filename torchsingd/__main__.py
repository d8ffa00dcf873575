"""``python -m torchsingd``: the command line (see :mod:`torchsingd.cli`)."""

from torchsingd.cli import main

raise SystemExit(main())
