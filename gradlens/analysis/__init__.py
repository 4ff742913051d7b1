"""The analysis layer: statistics of recorded runs read back from the store. :mod:`.driver` (``analyze_run``: one
run, out of core, shard by shard; :mod:`.passes` its passes over the shards; :mod:`.accumulated` the path for runs
recorded without raw shards; :mod:`.run_stats` what one run's analysis holds), :mod:`.analyze` (``analyze_runs``:
tables, figures and a finding for several runs; :mod:`.result` what it returns; :mod:`.figures` its PNGs) and
:mod:`.runinfo` (``gradlens info``). The package imports nothing itself: import the module you need."""
