import sys

from mmcompress.cli import main

sys.exit(main())
