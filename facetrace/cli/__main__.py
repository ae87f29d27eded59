import sys

from facetrace.cli.main import main

sys.exit(main())
