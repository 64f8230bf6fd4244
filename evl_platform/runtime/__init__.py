"""Where commands run and where they write: the Ray session and the run storage.

- :mod:`~evl_platform.runtime.session`: start or attach to Ray (``ray_session``), the
  runtime environment every worker gets, the cluster's defaults for an attached driver.
- :mod:`~evl_platform.runtime.storage`: Ray's run storage (a directory or a bucket), the
  run record tying a Ray run to its MLflow run, what must be shared on a cluster.
- :mod:`~evl_platform.runtime.cluster`: the shared-storage probe and the head's environment.
- :mod:`~evl_platform.runtime.hooks`: the worker setup hook (imports nothing heavy).

Every command (train, sweep, report, bench) enters Ray through this package. Import the
submodule you need: this file imports nothing, so the worker hook stays cheap.
"""
