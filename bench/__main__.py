"""Entry point: ``python -m bench [options]`` (see ``bench/cli.py`` and ``bench/README.md``)."""
import sys

from .cli import main

sys.exit(main())
