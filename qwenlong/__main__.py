import sys

from qwenlong.cli import main

sys.exit(main())
