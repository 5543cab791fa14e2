"""``python -m aigc``: the `aigc` command, as the supervisor starts each stage process."""

import sys

from aigc.cli import main

if __name__ == "__main__":
    sys.exit(main())
