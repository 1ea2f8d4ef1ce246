"""`python -m llmql` runs the command line."""

import sys

from llmql.cli import main

sys.exit(main())
