"""Write a sweep's report: tables, figures, significance and answers (see cluster/report/).

    python launch/report.py runs/sweep
    python launch/report.py s3://bucket/study --out /tmp/report"""
from cluster.report import main

if __name__ == "__main__":
    raise SystemExit(main())
