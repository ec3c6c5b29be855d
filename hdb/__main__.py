"""python -m hdb"""

import sys

from hdb.cli import main

sys.exit(main())
