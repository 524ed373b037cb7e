"""``python -m edgeship`` runs the command line."""

from edgeship.cli import main

main()
