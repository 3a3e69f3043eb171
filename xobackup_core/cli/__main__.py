"""``python -m xobackup_core.cli``: the same as the ``xobackup`` command."""

from xobackup_core.cli.main import main

main()
