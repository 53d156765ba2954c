import sys

from hanorec.cli import main

sys.exit(main())
