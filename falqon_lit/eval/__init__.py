"""Zero-shot evaluation: benchmark tasks (``tasks``), log-likelihood scoring (``scoring``), reports and the CLI."""
