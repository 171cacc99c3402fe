"""``python -m libvms``: the command line, as the ``libvms`` command runs it."""

from .cli import main

main(prog_name="libvms")
