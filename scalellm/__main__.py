import sys

from scalellm.cli import main

sys.exit(main())
