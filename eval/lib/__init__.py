"""The helpers of eval/'s scripts; nothing here is run on its own (the scripts are the files beside this folder).

A script run as ``python eval/X.py`` has eval/ first on ``sys.path``, so it imports these as ``lib.<module>``; the
tests put eval/ there through pytest's ``pythonpath`` (pyproject.toml).

- `results`: the output-folder policy (``--out-dir``, else a new folder under the temporary directory) and the writer;
- `environment`: the device and versions a result was measured with, the copy bandwidth;
- `models`, `caches`, `decoding`, `quanto`: the random-weight models, the caches compared, the decode loop
  (bench_generate, soak, bench_tensor_parallel);
- `generate_row`, `generate_budget`, `generate_report`: bench_generate's timed rows, memory-budget search, and
  its targets, tables and plot.
"""
