import sys

from ddpm_fast.cli import main

sys.exit(main())
