"""``python -m deltatune`` runs the command line."""

from deltatune.cli import main

raise SystemExit(main())
