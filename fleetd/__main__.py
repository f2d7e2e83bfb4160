"""``python -m fleetd`` runs the ``fleetd`` command line."""

from fleetd.cli import fleetd_main

raise SystemExit(fleetd_main.main())
