"""``python -m lrq_ao.convert`` runs the ``lrq-convert`` command line."""

from lrq_ao.convert.cli import main

if __name__ == "__main__":
    main()
