"""Sweeps: ablation files (one paper table each) run as Ray Tune trials with nested MLflow
runs; see :mod:`evl_platform.sweep.spec` (files and trials) and
:mod:`evl_platform.sweep.runner` (the driver)."""
