"""``python -m fewshot ...``: the command line, as torchrun starts it (``torchrun -m fewshot train ...``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
