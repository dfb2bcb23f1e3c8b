import sys

from rallypoint.worker.main import main

sys.exit(main())
