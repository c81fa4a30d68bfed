"""``python -m recsys.cli``: the same command line as the ``recsys`` script."""

from recsys.cli.main import app

app()
