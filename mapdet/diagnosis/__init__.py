"""Why the mAP is low: measurements, TIDE errors, model sweeps, ranked causes, the report."""
