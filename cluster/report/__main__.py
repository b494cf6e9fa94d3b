"""python -m cluster.report <storage> [--out URL]: the report's command line (cluster/report/cli.py)."""
from cluster.report.cli import main

raise SystemExit(main())
