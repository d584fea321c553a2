import sys

from snapkernel.agent.kernel_bridge import main

sys.exit(main())
