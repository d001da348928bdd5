"""`make bench`: edgediff's host build against PyTorch eager and onnxruntime (the code is
edgediff.tools.bench, also reachable as `edgediff bench`)."""

import sys

from edgediff.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
