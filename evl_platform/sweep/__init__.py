"""Sweeps: ablation files (one paper table each) run as Ray Tune trials with nested MLflow
runs. :mod:`.spec` reads ablation files, :mod:`.plan` expands them into trials with their
configs resolved once, :mod:`.runner` is the driver (:mod:`.runs` for the MLflow parent and
child runs, :mod:`.trials` for the Tune trials, :mod:`.search` and :mod:`.ensembles` for the
optional stages, :mod:`.progress` and :mod:`.summary` for what the user sees)."""
