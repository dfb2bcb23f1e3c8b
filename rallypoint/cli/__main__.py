import sys

from rallypoint.cli.main import main

sys.exit(main())
