"""The study (STUDY.md): when does FAM improve held-out performance, against what users would do instead?

Not part of the ``fam_hf`` wheel. ``study/run.py`` trains and tables one study config through the recipes in
``recipes/`` (and their kit, ``recipes/kit``); ``study/report.py`` rebuilds every table from the committed records.

* :mod:`study.harness`: the study's arguments, methods, grids, regimes and the selection on validation;
* :mod:`study.tables`: the tables from the run records (byte-identical when rebuilt); :mod:`study.stats` their
  statistics;
* :mod:`study.rescaling`: the function-preserving rescaling control;
* :mod:`study.data`: the study's own data sets (``debates-2016``, ``conventions-2012``).
"""
