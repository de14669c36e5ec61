import sys

from report.index import main

sys.exit(main())
