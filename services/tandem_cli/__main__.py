import sys

from tandem_cli.main import main

sys.exit(main())
