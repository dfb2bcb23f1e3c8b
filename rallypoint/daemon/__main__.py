import sys

from rallypoint.daemon.main import main

sys.exit(main())
