import sys

from intentd.cli import main

sys.exit(main())
