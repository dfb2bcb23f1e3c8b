import os
import sys

if "--standby" in sys.argv[1:]:  # a pre-imported interpreter that waits for a worker's argv
    from rallypoint.worker.standby import main
else:
    from rallypoint.worker.main import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # no interpreter teardown: torch's NCCL threads must not be destroyed under it
