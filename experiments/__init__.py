"""Research code on top of the library, outside the installed ``gradlens`` package: the rival measurements and the
phase diagram (:mod:`.rivals`) and the notebooks' settings and runners (:mod:`.notebook_settings`).

Importable from the repository root: the tests run there (``pythonpath = ["."]`` in ``pyproject.toml``), and the
scripts in ``scripts/`` and the notebooks in ``notebooks/`` put the root on ``sys.path`` first."""
