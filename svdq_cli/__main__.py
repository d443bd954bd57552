"""``python -m svdq_cli`` (what ``torchrun -m svdq_cli quantize …`` runs): the ``svdq`` command."""

from .cli import main

main()
