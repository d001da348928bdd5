import sys

from edgediff.cli import main

sys.exit(main())
