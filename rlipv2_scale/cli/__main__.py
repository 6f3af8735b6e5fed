import sys

from rlipv2_scale.cli import main

sys.exit(main())
