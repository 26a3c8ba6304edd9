import sys

from realisr.cli.main import main

sys.exit(main())
