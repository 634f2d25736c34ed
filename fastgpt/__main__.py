"""`python -m fastgpt` is `python -m fastgpt.train`."""

import sys

from fastgpt.train import main

sys.exit(main())
