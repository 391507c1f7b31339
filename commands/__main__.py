import sys

from intentd.commands.cli import main

sys.exit(main())
