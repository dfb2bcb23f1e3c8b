import os
import sys

from rallypoint.worker.main import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # no interpreter teardown: torch's NCCL threads must not be destroyed under it
