"""``python -m svdq_cli`` (what ``torchrun -m svdq_cli quantize …`` runs): the ``svdq`` command."""

from .cli.main import main

main()
