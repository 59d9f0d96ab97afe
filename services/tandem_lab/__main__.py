import sys

from tandem_lab.main import main

sys.exit(main())
