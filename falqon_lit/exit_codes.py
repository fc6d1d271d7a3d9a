"""Exit statuses shared by the ``falqon``, ``falqon eval``, ``falqon plot`` and ``falqon-export`` command lines."""

EXIT_OK = 0
"""Done."""
EXIT_CHECK_FAILED = 1
"""The work ran but a check failed (``falqon-export`` verification out of tolerance); nothing was written."""
EXIT_USAGE = 2
"""Bad input (arguments, config, data, checkpoint): one ``error:`` line on stderr, before anything is written."""
