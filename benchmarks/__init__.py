"""Speed, quality and serving benchmarks of falqon-lit (not tests; numbers in ``benchmarks/RESULTS.md``).

Each benchmark is a module run from the repository root as ``python -m benchmarks.<name>``: ``-m`` puts the working
directory on the import path, so a benchmark imports the installed ``falqon_lit`` and its shared code as
``benchmarks.<module>`` (``harness``: timing, the shape-sweep command line, result files) with no path edits.
Benchmarks that run parts in child processes start them the same way, from the same working directory.
"""
