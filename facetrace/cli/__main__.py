import sys

from facetrace.cli.app import main

sys.exit(main())
